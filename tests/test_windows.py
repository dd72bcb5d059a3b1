"""Window machinery: geometry of windows, and batched token-selection embeddings against slow references."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from service.window_grid import coverage, incidence_matrix, window_boxes, window_indices, window_starts
from service.windows import crop_window_embeddings, embed_image_and_windows, feature_grid
from tests.helpers_models import tiny_backend

TOL = 1e-5


# --- geometry ------------------------------------------------------------------------------------------------------
def _naive_coverage(h: int, w: int, scale: int, stride: int) -> torch.Tensor:
    counts = torch.zeros(h, w, dtype=torch.long)
    for r0, c0, r1, c1 in window_boxes(h, w, scale, stride).tolist():
        for r in range(r0, r1):
            for c in range(c0, c1):
                counts[r, c] += 1
    return counts


def test_window_counts_winclip_grid():
    assert window_indices(15, 15, 2, 1).shape == (196, 4)
    assert window_indices(15, 15, 3, 1).shape == (169, 9)


@pytest.mark.parametrize("h,w,scale,stride",
                         [(15, 15, 2, 1), (15, 15, 3, 1), (6, 6, 3, 2), (5, 7, 2, 2), (4, 9, 3, 3), (3, 3, 3, 1)])
def test_coverage_counts(h, w, scale, stride):
    idx = window_indices(h, w, scale, stride)
    cov = coverage(h, w, idx)
    assert torch.equal(cov, _naive_coverage(h, w, scale, stride))
    assert (cov >= 1).all(), "every patch must be covered"
    assert int(cov.sum()) == idx.shape[0] * scale * scale
    inc = incidence_matrix(h, w, idx)
    assert inc.shape == (h * w, idx.shape[0])
    assert torch.equal(inc.sum(1).long().reshape(h, w), cov)


def test_coverage_pattern_stride1():
    cov = coverage(15, 15, window_indices(15, 15, 3, 1))
    assert cov[0, 0] == 1 and cov[0, 1] == 2 and cov[1, 1] == 4 and cov[7, 7] == 9 and cov[0, 7] == 3


def test_window_indices_row_major():
    idx = window_indices(4, 5, 2, 1)
    assert idx[0].tolist() == [0, 1, 5, 6]
    assert idx[1].tolist() == [1, 2, 6, 7]
    assert idx[4].tolist() == [5, 6, 10, 11]  # second row of windows starts after 4 windows per row
    assert window_starts(6, 3, 2) == [0, 2, 3]  # the edge window is added so the last cells are covered


def test_bad_windows():
    with pytest.raises(ValueError):
        window_indices(3, 3, 4, 1)
    with pytest.raises(ValueError):
        window_indices(3, 3, 2, 0)


# --- tiny models ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("store_vit"), "vit", seed=1)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("store_cnn"), "cnn", seed=2)


def _pixels(backend, n=2, seed=0, hw=None):
    s = backend.image_size
    h, w = hw or (s, s)
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _vit_reference(backend, pixels, scale, stride):
    """Each window alone: its token subset gathered in a plain loop, sent through the *module* forward."""
    visual = backend.model.visual
    tokens = visual._embeds(pixels)  # open_clip's own patch embedding path
    gh, gw = feature_grid(visual, pixels.shape[-2:])
    out = []
    for b in range(pixels.shape[0]):
        per_image = []
        for r0, c0, r1, c1 in window_boxes(gh, gw, scale, stride).tolist():
            rows = [tokens[b, 0]]
            for r in range(r0, r1):
                for c in range(c0, c1):
                    rows.append(tokens[b, 1 + r * gw + c])
            x = visual.transformer(torch.stack(rows)[None])
            pooled, _ = visual._pool(x)
            per_image.append(backend.finish_image(pooled @ visual.proj)[0])
        out.append(torch.stack(per_image))
    return torch.stack(out)


@torch.inference_mode()
def _cnn_reference(backend, pixels, scale, stride):
    """Each window alone through a copy of the model's AttentionPool2d whose positional embedding is the window's
    slice (query row 0, then 1 + cell index), fed the window's cells as a 1 x K map: the pool's own forward."""
    visual = backend.model.visual
    fmap = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))
    _, c, gh, gw = fmap.shape
    out = []
    for b in range(pixels.shape[0]):
        per_image = []
        for r0, c0, r1, c1 in window_boxes(gh, gw, scale, stride).tolist():
            cells, pos_rows = [], [0]
            for r in range(r0, r1):
                for cc in range(c0, c1):
                    cells.append(fmap[b, :, r, cc])
                    pos_rows.append(1 + r * gw + cc)
            pool = copy.deepcopy(visual.attnpool)
            pool.positional_embedding = torch.nn.Parameter(visual.attnpool.positional_embedding[pos_rows].clone())
            x = torch.stack(cells, dim=1).reshape(1, c, 1, len(cells))
            per_image.append(backend.finish_image(pool(x))[0])
        out.append(torch.stack(per_image))
    return torch.stack(out)


@pytest.mark.parametrize("scale,stride", [(2, 1), (3, 1), (3, 2)])
def test_vit_windows_match_slow_reference(vit, scale, stride):
    px = _pixels(vit)
    emb = embed_image_and_windows(vit, px, scales=(scale,), stride=stride, chunk=7)
    ref = _vit_reference(vit, px, scale, stride)
    assert emb.windows[scale].shape == ref.shape
    torch.testing.assert_close(emb.windows[scale], ref, atol=TOL, rtol=0)
    # the windows really differ from each other and from the image (no accidental broadcasting)
    assert (emb.windows[scale][0, 0] - emb.windows[scale][0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "vision,quick_gelu",
    [
        ({"ls_init_value": 0.1}, False),  # layer scale on the fused path
        ({"pool_type": "avg", "final_ln_after_pool": True}, False),  # mean pooling: module-order fallback
        ({"qk_norm": True}, False),  # custom blocks: the module's own forward
        ({}, True),  # QuickGELU: not fusable into the matmul
    ],
)
def test_vit_variants_match_reference(tmp_path, vision, quick_gelu):
    backend = tiny_backend(tmp_path, "vit", seed=5, vision=vision, quick_gelu=quick_gelu)
    px = _pixels(backend, n=2, seed=9)
    grid = feature_grid(backend.model.visual, px.shape[-2:])
    emb = embed_image_and_windows(backend, px, scales=(2, grid[0]), stride=1, chunk=11)
    torch.testing.assert_close(emb.windows[2], _vit_reference(backend, px, 2, 1), atol=TOL, rtol=0)
    torch.testing.assert_close(emb.windows[grid[0]][:, 0], backend.encode_image(px), atol=TOL, rtol=0)
    torch.testing.assert_close(emb.global_emb, backend.encode_image(px), atol=TOL, rtol=0)


@pytest.mark.parametrize("scale,stride", [(2, 1), (3, 1), (2, 2)])
def test_cnn_attnpool_windows_match_slow_reference(cnn, scale, stride):
    px = _pixels(cnn)
    emb = embed_image_and_windows(cnn, px, scales=(scale,), stride=stride, chunk=5, cnn_mode="attnpool")
    ref = _cnn_reference(cnn, px, scale, stride)
    torch.testing.assert_close(emb.windows[scale], ref, atol=TOL, rtol=0)
    assert (emb.windows[scale][0, 0] - emb.windows[scale][0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_full_window_equals_encode_image(vit, cnn, kind):
    backend = vit if kind == "vit" else cnn
    px = _pixels(backend, n=3, seed=5)
    grid = feature_grid(backend.model.visual, px.shape[-2:])
    emb = embed_image_and_windows(backend, px, scales=(grid[0],), stride=1, chunk=2)
    ref = backend.encode_image(px)
    assert emb.windows[grid[0]].shape[1] == 1
    torch.testing.assert_close(emb.windows[grid[0]][:, 0], ref, atol=TOL, rtol=0)
    torch.testing.assert_close(emb.global_emb, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(emb.global_emb.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_chunking_and_batching_do_not_change_results(vit, cnn, kind):
    backend = vit if kind == "vit" else cnn
    px = _pixels(backend, n=3, seed=7)
    a = embed_image_and_windows(backend, px, scales=(2, 3), chunk=1)
    b = embed_image_and_windows(backend, px, scales=(2, 3), chunk=4096)
    alone = embed_image_and_windows(backend, px[1:2], scales=(2, 3), chunk=4096)
    for s in (2, 3):
        torch.testing.assert_close(a.windows[s], b.windows[s], atol=TOL, rtol=0)
        torch.testing.assert_close(alone.windows[s][0], b.windows[s][1], atol=TOL, rtol=0)


def test_packed_weights_follow_in_place_changes(tmp_path):
    """The oneDNN weight cache must never serve stale weights: change a weight in place, results must follow.

    Packing is on by default only on AMX CPUs; it is switched on here wherever oneDNN can pack, so it is tested."""
    from service import fast_transformer

    if fast_transformer._REORDER_WEIGHT is None:
        pytest.skip("this torch build has no oneDNN weight packing")
    backend = tiny_backend(tmp_path, "vit", seed=3)
    px = _pixels(backend, n=1, seed=11)
    old = fast_transformer.PREPACK_WEIGHTS
    try:
        fast_transformer.PREPACK_WEIGHTS = True
        before = embed_image_and_windows(backend, px, scales=(2,), chunk=64)
        with torch.no_grad():
            backend.model.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(1.5)
        after = embed_image_and_windows(backend, px, scales=(2,), chunk=64)
        assert fast_transformer._PACKED, "no weight was packed: the test would not test the cache"
        fast_transformer.PREPACK_WEIGHTS = False
        plain = embed_image_and_windows(backend, px, scales=(2,), chunk=64)
    finally:
        fast_transformer.PREPACK_WEIGHTS = old
    ref = _vit_reference(backend, px, 2, 1)
    torch.testing.assert_close(after.windows[2], ref, atol=TOL, rtol=0)
    assert (after.windows[2] - before.windows[2]).abs().max() > 1e-4
    torch.testing.assert_close(plain.windows[2], after.windows[2], atol=TOL, rtol=0)


@torch.inference_mode()
def test_bf16_windows_close_to_fp32(vit):
    """bf16 on CPU (fused oneDNN linears) stays close to fp32."""
    model16 = copy.deepcopy(vit.model).to(torch.bfloat16)
    backend16 = copy.copy(vit)
    backend16.model, backend16.dtype = model16, torch.bfloat16
    px = _pixels(vit, n=2, seed=4)
    a = embed_image_and_windows(vit, px, scales=(2, 3), chunk=64)
    b = embed_image_and_windows(backend16, px, scales=(2, 3), chunk=64)
    for s in (2, 3):
        cos = (a.windows[s] * b.windows[s]).sum(-1)
        assert float(cos.min()) > 0.99


def test_scales_larger_than_grid_are_left_out(cnn):
    emb = embed_image_and_windows(cnn, _pixels(cnn, n=1), scales=(2, 3, 9), chunk=64)
    assert sorted(emb.windows) == [2, 3] and sorted(emb.indices) == [2, 3]


def test_vit_non_native_input_size(vit):
    """Larger / non-square input: the grid follows the input and the positional grid is interpolated."""
    px = _pixels(vit, n=1, hw=(64, 40))
    emb = embed_image_and_windows(vit, px, scales=(2, 3), chunk=64)
    assert emb.grid == (8, 5)
    assert emb.windows[2].shape[:2] == (1, 7 * 4) and emb.windows[3].shape[:2] == (1, 6 * 3)
    assert torch.isfinite(emb.windows[3]).all()


def test_cnn_upsampled_input_gives_finer_grid(cnn):
    px = _pixels(cnn, n=2, hw=(256, 256))
    emb = embed_image_and_windows(cnn, px, scales=(2, 3, 4), chunk=64)
    assert emb.grid == (8, 8)
    assert emb.windows[4].shape[:2] == (2, 25)
    native = F.interpolate(px, size=(128, 128), mode="bilinear", align_corners=False)
    with_native = embed_image_and_windows(cnn, px, scales=(2, 3, 4), chunk=64, global_pixels=native)
    torch.testing.assert_close(with_native.global_emb, cnn.encode_image(native), atol=TOL, rtol=0)
    torch.testing.assert_close(with_native.windows[3], emb.windows[3], atol=TOL, rtol=0)


def test_timings_recorded(vit):
    timings: dict[str, float] = {}
    embed_image_and_windows(vit, _pixels(vit, n=1), scales=(2,), chunk=64, timings=timings)
    assert set(timings) == {"embed", "windows"} and all(v >= 0 for v in timings.values())


@torch.inference_mode()
def test_cnn_crop_mode(cnn):
    px = _pixels(cnn, n=2, seed=3, hw=(256, 256))  # grid 8 x 8 cells of 32 px
    emb = embed_image_and_windows(cnn, px, scales=(4,), stride=4, chunk=16, cnn_mode="crop")
    assert emb.windows[4].shape[:2] == (2, 4)
    # window 1 = rows 0..3, cols 4..7 -> pixels [0:128, 128:256], already the model size: no resize
    ref = cnn.encode_image(px[:, :, 0:128, 128:256])
    torch.testing.assert_close(emb.windows[4][:, 1], ref, atol=TOL, rtol=0)
    glob = cnn.encode_image(F.interpolate(px, size=(128, 128), mode="bicubic", align_corners=False, antialias=True))
    torch.testing.assert_close(emb.global_emb, glob, atol=TOL, rtol=0)


@torch.inference_mode()
def test_crop_windows_any_tower(vit):
    px = _pixels(vit, n=1)
    raw = crop_window_embeddings(vit.model, px, window_boxes(6, 6, 6, 1), (6, 6), vit.image_size, chunk=8)
    torch.testing.assert_close(vit.finish_image(raw[:, 0]), vit.encode_image(px), atol=TOL, rtol=0)


def test_bad_cnn_mode(cnn):
    with pytest.raises(ValueError):
        embed_image_and_windows(cnn, _pixels(cnn, n=1), cnn_mode="nope")  # type: ignore[arg-type]


def test_dense_features_average_3x3_neighbourhoods_and_channel_groups():
    from service.windows import DENSE_DIM, dense_features

    gen = torch.Generator().manual_seed(0)
    mid = torch.randn(2, 4 * DENSE_DIM, 5, 6, generator=gen)
    rows, grid = dense_features(mid)
    assert grid == (5, 6) and rows.shape == (2, 30, DENSE_DIM)
    b, r, c = 1, 2, 3  # an inner cell: the mean of its 3x3 neighbourhood, then of each group of 4 channels
    patch = mid[b, :, r - 1:r + 2, c - 1:c + 2].mean(dim=(1, 2))
    expected = torch.nn.functional.normalize(patch.reshape(DENSE_DIM, 4).mean(dim=1), dim=0)
    torch.testing.assert_close(rows[b, r * 6 + c], expected, atol=1e-5, rtol=0)
    corner = mid[b, :, :2, :2].sum(dim=(1, 2)) / 9  # the padding counts as zeros, as avg_pool2d counts it
    expected = torch.nn.functional.normalize(corner.reshape(DENSE_DIM, 4).mean(dim=1), dim=0)
    torch.testing.assert_close(rows[b, 0], expected, atol=1e-5, rtol=0)
    narrow, _ = dense_features(mid[:, :DENSE_DIM])  # already narrow: channels kept
    assert narrow.shape[-1] == DENSE_DIM
    # a width that does not divide the channels: adaptive pooling after the 3x3 average, as before
    odd = mid[:, :96]
    pooled = F.avg_pool2d(odd, 3, stride=1, padding=1).reshape(2, 96, 30).transpose(1, 2)
    want = F.normalize(F.adaptive_avg_pool1d(pooled.reshape(60, 1, 96), DENSE_DIM).reshape(2, 30, DENSE_DIM), dim=-1)
    torch.testing.assert_close(dense_features(odd)[0], want, atol=1e-6, rtol=0)
