import numpy as np
import pytest
import torch
from PIL import Image

from service.constants import VIEW_COUNTS
from service.detector import load_detector
from service.settings import Settings
from service.tta import CPU_WINDOW_PASS_IMAGES, average_embeddings, dihedral_views, encode_global
from tests.conftest import publish_tiny_model


def _key(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


@pytest.mark.parametrize("n", VIEW_COUNTS)
def test_each_prefix_of_views_is_a_group(n):
    # Closed under composition: turning any view by the same n views gives back the same set. So averaging over
    # them does not depend on how the part lies (up to those turns), and no orientation counts twice.
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = dihedral_views(x, n)
    assert len({_key(v) for v in views}) == n
    for v in views:
        assert {_key(w) for w in dihedral_views(v, n)} == {_key(w) for w in views}


def test_bad_view_counts_and_non_square_inputs_are_refused():
    with pytest.raises(ValueError, match="one of"):
        dihedral_views(torch.zeros(1, 3, 4, 4), 3)
    with pytest.raises(ValueError, match="square"):
        dihedral_views(torch.zeros(1, 3, 4, 5), 2)


def test_average_is_normalised():
    a = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    out = average_embeddings([a, b])
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(out, torch.nn.functional.normalize(a + b, dim=-1), atol=1e-6)


def test_eight_views_make_the_embedding_orientation_free(tiny_backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, tiny_backend.image_size, tiny_backend.image_size, generator=g)

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    quarter, half = torch.rot90(x, 1, dims=(-2, -1)), torch.rot90(x, 2, dims=(-2, -1))
    assert gap(tiny_backend.encode_image(x), tiny_backend.encode_image(quarter)) > 1e-4  # the model itself is not
    assert gap(encode_global(tiny_backend, x, 8), encode_global(tiny_backend, quarter, 8)) < 1e-6
    # A half turn is in the 4-view group, a quarter turn is not.
    assert gap(encode_global(tiny_backend, x, 4), encode_global(tiny_backend, half, 4)) < 1e-6
    assert gap(encode_global(tiny_backend, x, 4), encode_global(tiny_backend, quarter, 4)) > 1e-4


def test_a_given_identity_embedding_is_used_not_recomputed(tiny_backend):
    x = torch.randn(3, 3, tiny_backend.image_size, tiny_backend.image_size, generator=torch.Generator().manual_seed(2))
    full = encode_global(tiny_backend, x, 2)
    assert torch.allclose(encode_global(tiny_backend, x, 2, identity=tiny_backend.encode_image(x)), full, atol=1e-6)
    # one view is the plain embedding (a CNN's input in channels-last layout on the CPU: the same up to rounding)
    assert torch.allclose(encode_global(tiny_backend, x, 1), tiny_backend.encode_image(x), atol=1e-6)


@pytest.fixture(scope="module")
def tta_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ttastore")
    publish_tiny_model(root, "default", n_pairs=120, epochs=2)
    return root


def _square(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_detector_views_come_from_settings_then_manifest(tta_store):
    det = load_detector(Settings(model_store=tta_store, device="cpu"))
    assert det.tta_views == 1  # nothing recommended
    assert det.with_fnn(det.fnn, {**det.manifest, "tta": {"views": 4}}).tta_views == 4
    det8 = load_detector(Settings(model_store=tta_store, device="cpu", tta_views=8))
    assert det8.with_fnn(det8.fnn, {**det8.manifest, "tta": {"views": 4}}).tta_views == 8


def test_detector_with_eight_views_ignores_a_quarter_turn(tta_store):
    image = _square(5)
    turned = image.transpose(Image.Transpose.ROTATE_90)
    plain = load_detector(Settings(model_store=tta_store, device="cpu"))
    det = load_detector(Settings(model_store=tta_store, device="cpu", tta_views=8))

    def gap(d) -> float:
        a, b = d.embed([image, turned], heatmap=False)
        return float((a.global_emb - b.global_emb).abs().max())

    assert gap(plain) > 1e-4  # without views the turn does matter
    assert gap(det) < 1e-5  # resampling a turned image is exact only up to float rounding
    # The heatmap path uses the same averaged global embedding, and the scores follow it.
    with_map = det.embed([image])[0]
    without = det.embed([image], heatmap=False)[0]
    assert torch.allclose(with_map.global_emb, without.global_emb, atol=1e-6)
    assert det.score([with_map])[0].scores == pytest.approx(det.score([without])[0].scores, abs=1e-6)


def test_one_image_pools_its_views_from_the_window_pass_forward_and_a_batch_does_not(tta_store, monkeypatch):
    """Detector.embed with a heatmap: one image's test-time views share the backbone forward of the window pass (one
    forward of 4 images, not 1 and then 3); a batch whose views would exceed that forward's CPU size keeps encode_global.
    The global embedding is the same either way, and the same as without a heatmap."""
    det = load_detector(Settings(model_store=tta_store, device="cpu", tta_views=4))
    calls: list[int] = []
    original = type(det.backend).encode_image

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(type(det.backend), "encode_image", counting)
    one = det.embed([_square(7)])[0]
    assert calls == []  # the three other views were pooled from the window pass's forward
    det.embed([_square(7), _square(8)])
    assert calls == []  # so were those of a small batch
    seeds = range(7, 7 + CPU_WINDOW_PASS_IMAGES // 4 + 1)  # 4 views of these images exceed one CPU window pass
    batch = det.embed([_square(s) for s in seeds])
    assert sum(calls) == 3 * len(seeds)  # the three other views of every image, through encode_global
    assert torch.allclose(one.global_emb, batch[0].global_emb, atol=1e-5)
    calls.clear()
    plain = det.embed([_square(7)], heatmap=False)[0]
    assert sum(calls) == 4 and torch.allclose(one.global_emb, plain.global_emb, atol=1e-5)


def test_views_setting_is_read_from_the_environment_and_checked(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setenv("ZSAD_TTA_VIEWS", "8")
    assert Settings().tta_views == 8
    monkeypatch.setenv("ZSAD_TTA_VIEWS", "3")
    with pytest.raises(ValidationError, match="1, 2, 4 or 8"):
        Settings()


def test_views_grouped_into_several_forwards_give_the_same_embedding(tiny_backend, monkeypatch):
    x = torch.randn(3, 3, tiny_backend.image_size, tiny_backend.image_size, generator=torch.Generator().manual_seed(4))
    grouped = encode_global(tiny_backend, x, 8)  # 3 images: max(3, 8) // 3 = 2 views per forward
    sizes = []
    original = type(tiny_backend).encode_image

    def counting(self, pixels):
        sizes.append(pixels.shape[0])
        return original(self, pixels)

    monkeypatch.setattr(type(tiny_backend), "encode_image", counting)
    monkeypatch.setattr("service.tta.CPU_IMAGES_PER_FORWARD", 3)  # one view per forward
    assert torch.allclose(encode_global(tiny_backend, x, 8), grouped, atol=1e-6)
    assert sizes == [3] * 8


def test_training_config_refuses_a_view_count_before_any_work():
    from service.train import TrainConfig

    assert TrainConfig(tta_views=4).tta_views == 4
    with pytest.raises(ValueError, match="tta_views"):
        TrainConfig(tta_views=3)
