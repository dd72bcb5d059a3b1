"""The stride-8 CNN tower (service/cnn_tower.py): a 12x12 map at 96 px with the same parameters, loaded the same way
from the store, and window pooling over the whole map still equals the global embedding."""
import pytest
import torch

from service.cnn_tower import (
    FINE_TOWER,
    apply_tower,
    attnpool_first_token,
    cnn_stride,
    fold_batchnorm,
    resize_attnpool,
    resnet_global,
)
from service.windows import cnn_feature_map, cnn_window_embeddings, feature_grid


def _clip(image_size: int, tower=None):
    from open_clip.model import CLIP

    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
    return apply_tower(CLIP(**cfg), tower).eval()


def test_fine_tower_gives_a_12x12_grid_at_96_px_with_the_same_parameter_shapes():
    coarse, fine = _clip(96), _clip(96, FINE_TOWER)
    assert cnn_stride(coarse.visual) == 32 and cnn_stride(fine.visual) == 8
    assert feature_grid(fine.visual, (96, 96)) == (12, 12)
    with torch.no_grad():
        assert cnn_feature_map(fine.visual, torch.zeros(1, 3, 96, 96)).shape[-2:] == (12, 12)
    a, b = coarse.state_dict(), fine.state_dict()
    assert a.keys() == b.keys()
    diff = [k for k in a if a[k].shape != b[k].shape]
    assert diff == ["visual.attnpool.positional_embedding"] and b[diff[0]].shape[0] == 145


def test_whole_map_window_equals_encode_image():
    model = _clip(96, FINE_TOWER)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        fmap = cnn_feature_map(model.visual, x)
        win = cnn_window_embeddings(model.visual, fmap, torch.arange(144).view(1, -1), chunk=8)[:, 0]
        full = model.visual(x)
    torch.testing.assert_close(win, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("size", "tower"), [(64, None), (96, FINE_TOWER)])
def test_the_one_token_attention_pool_equals_the_modules_forward(size, tower):
    """`resnet_global` (what ClipBackend.encode_image runs for CNN towers) against open_clip's attnpool, which
    computes every token and keeps the first; the weights are trained-like (non-zero biases, scaled positions)."""
    model = _clip(size, tower)
    pool = model.visual.attnpool
    with torch.no_grad():
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            proj.bias.normal_(0, 0.5)
        pool.positional_embedding.mul_(3)
        x = torch.randn(3, 3, size, size)
        fmap = cnn_feature_map(model.visual, x)
        torch.testing.assert_close(attnpool_first_token(pool, fmap), pool(fmap), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(resnet_global(model.visual, x), model.visual(x), rtol=1e-5, atol=1e-5)


def test_resize_attnpool_keeps_the_class_row_and_unknown_options_fail():
    pos = torch.randn(37, 4)
    out = resize_attnpool(pos, 12)
    assert out.shape == (145, 4) and torch.equal(out[0], pos[0])
    with pytest.raises(ValueError):
        apply_tower(_clip(96), {"stem_strides": 1})


def test_shared_key_projection_equals_pooling_each_window_sequence():
    from service.window_grid import window_indices
    from service.windows import _attnpool_sequences, _pos_for_grid

    model = _clip(96, FINE_TOWER)
    with torch.no_grad():
        fmap = cnn_feature_map(model.visual, torch.randn(2, 3, 96, 96))
        idx = window_indices(12, 12, 3, 2)
        fast = cnn_window_embeddings(model.visual, fmap, idx, chunk=7)
        pool = model.visual.attnpool
        pos = _pos_for_grid(pool.positional_embedding, (12, 12))
        cells = fmap.reshape(2, fmap.shape[1], 144).transpose(1, 2)
        ref = torch.stack([_attnpool_sequences(pool, cells[i][idx], pos[0], pos[1 + idx]) for i in range(2)])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_cached_positional_projections_follow_weights_changed_in_place():
    """The pool's projected positional rows are cached; changing a weight in place must not serve the old rows."""
    from service.window_grid import window_indices
    from service.windows import _attnpool_sequences, _pos_for_grid

    model = _clip(96, FINE_TOWER)
    pool = model.visual.attnpool
    idx = window_indices(12, 12, 2, 1)
    with torch.no_grad():
        fmap = cnn_feature_map(model.visual, torch.randn(1, 3, 96, 96))
        first = cnn_window_embeddings(model.visual, fmap, idx, chunk=64)
        assert "_zsad_positions" in pool.__dict__  # cached by the first call
        pool.k_proj.bias.add_(0.5)
        pool.positional_embedding.mul_(1.5)
        again = cnn_window_embeddings(model.visual, fmap, idx, chunk=64)
        pos = _pos_for_grid(pool.positional_embedding, (12, 12))
        cells = fmap.reshape(1, fmap.shape[1], 144).transpose(1, 2)
        ref = _attnpool_sequences(pool, cells[0][idx], pos[0], pos[1 + idx])[None]
    assert not torch.allclose(first, again)
    torch.testing.assert_close(again, ref, rtol=1e-4, atol=1e-5)


def test_positional_rows_made_without_a_gradient_are_not_served_to_training():
    """Rows cached under no_grad would cut the positional embedding off the graph of a later training step."""
    from service.window_grid import window_indices

    model = _clip(96, FINE_TOWER)
    pool = model.visual.attnpool
    idx = window_indices(12, 12, 2, 1)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        cnn_window_embeddings(model.visual, cnn_feature_map(model.visual, x), idx, chunk=64)
    assert "_zsad_positions" in pool.__dict__
    cnn_window_embeddings(model.visual, cnn_feature_map(model.visual, x), idx, chunk=64).square().sum().backward()
    assert pool.positional_embedding.grad is not None and pool.positional_embedding.grad.abs().sum() > 0
    assert pool.k_proj.bias.grad is not None


@pytest.mark.parametrize("tower", [None, FINE_TOWER])
def test_folded_batchnorms_give_the_same_tower_in_one_pass_less(tower):
    import copy

    from tests.helpers_models import _randomise

    model = _clip(96, tower)
    _randomise(model, 3)  # BN statistics far from the identity, so a wrong fold shows
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded.visual) == n_bn == 19  # stem 3, four bottlenecks x 3, four downsamples
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.visual.modules())
    x = torch.randn(2, 3, 96, 96)
    def close(a, b):  # the random tower's outputs run to ~1e3: compare relative to their scale
        return (a - b).abs().max() <= 1e-5 * b.abs().max()

    with torch.no_grad():
        assert close(folded.encode_image(x), model.encode_image(x))
        assert close(cnn_feature_map(folded.visual, x), cnn_feature_map(model.visual, x))
    assert fold_batchnorm(folded.visual) == 0  # nothing left to fold


def test_a_served_bf16_cnn_tower_is_folded_in_fp32_and_rounded_once(tmp_path):
    from service.clip_backend import load_clip
    from tests.helpers_models import tiny_backend

    spec = tiny_backend(tmp_path, kind="rn", seed=2).spec
    fp32 = load_clip(spec, tmp_path, device="cpu", precision="fp32")
    bf16 = load_clip(spec, tmp_path, device="cpu", precision="bf16", text_tower=False)
    plain = load_clip(spec, tmp_path, device="cpu", precision="fp32", fold_bn=False)
    assert fp32.info["batchnorms_folded"] == bf16.info["batchnorms_folded"] == 19 and not plain.info["batchnorms_folded"]
    ref = fp32.model.visual.state_dict()
    for name, t in bf16.model.visual.state_dict().items():  # what a bf16 fold would round twice differs here
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[name].to(torch.bfloat16)), name
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model.visual.modules())
    vit = tiny_backend(tmp_path / "vit", kind="vit")
    assert fold_batchnorm(vit.model.visual) == 0  # a ViT tower is left alone


def test_pooling_every_scale_at_once_equals_each_window_sequence():
    """`cnn_windows` pools windows of different sizes (the global window and three scales) in one masked attention;
    each must equal the attention pool over that window's own sequence, whatever the image chunking."""
    from service.window_grid import window_indices
    from service.windows import _attnpool_sequences, _pos_for_grid, cnn_windows, window_membership

    model = _clip(96, FINE_TOWER)
    pool = model.visual.attnpool
    sets = [torch.arange(144).view(1, -1)] + [window_indices(12, 12, s, 2) for s in (1, 2, 3)]
    with torch.no_grad():
        fmap = cnn_feature_map(model.visual, torch.randn(3, 3, 96, 96))
        member = window_membership(sets, (12, 12))
        assert member.shape == (sum(i.shape[0] for i in sets), 144) and member.sum(1).tolist()[:2] == [144.0, 1.0]
        whole = cnn_windows(model.visual, fmap, member, chunk=1 << 20)
        one_by_one = cnn_windows(model.visual, fmap, member, chunk=1)  # one image, one window per step
        some = cnn_windows(model.visual, fmap, member, chunk=50)  # fewer than the windows: split within an image
        pos = _pos_for_grid(pool.positional_embedding, (12, 12))
        cells = fmap.reshape(3, fmap.shape[1], 144).transpose(1, 2)
        ref = torch.cat([torch.stack([_attnpool_sequences(pool, cells[i][idx], pos[0], pos[1 + idx]) for i in range(3)])
                         for idx in sets], dim=1)
    torch.testing.assert_close(whole, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one_by_one, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(some, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole[:, 0], pool(fmap), rtol=1e-4, atol=1e-5)  # the global window is the module's output
