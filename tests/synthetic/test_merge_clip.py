"""`zsad synth merge-clip`: the published weights are the interpolation, the ends are the parents, mismatches refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from service.cli import main as zsad
from service.store import ModelStore, StoreError
from service.synthetic.merge_clip import interpolate_state, merge_clips
from service.synthetic.train_clip import TrainClipConfig, TrainResult, build_model, publish

NAME = "tiny-factory-clip"


def _cfg(**kw) -> TrainClipConfig:
    base = dict(render_size=32, image_size=64, embed_dim=32, vision_width=8, text_width=32, text_layers=1,
                text_heads=2, context_length=64, device="cpu", workers=0, centre_images=8, centre_captions=8)
    base.update(kw)
    return TrainClipConfig(**base)


def _publish(root, seed: int, version: str, **kw) -> None:
    torch.manual_seed(seed)
    cfg = _cfg(version=version, **kw)
    model = build_model(cfg)
    with torch.no_grad():  # BatchNorm statistics that differ between the parents, as after training
        for name, buf in model.named_buffers():
            if "running_mean" in name:
                buf.normal_()
    result = TrainResult(0, 0, [], [], 0.0, "cpu", False, model=model)
    publish(result, cfg, root, device="cpu", log=lambda _: None)


def _weights(root, version: str) -> dict[str, torch.Tensor]:
    folder = ModelStore(root).path(NAME, version)
    return load_file(str(folder / "open_clip_model.safetensors"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("store")
    _publish(root, 0, "v1")
    _publish(root, 1, "v2")
    return root


def test_interpolation_is_the_line_between_the_parents():
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    b = {"w": torch.full((3,), 4.0), "n": torch.tensor(7)}
    assert torch.equal(interpolate_state(a, b, 0.25)["w"], torch.ones(3))
    assert interpolate_state(a, b, 0.25)["n"].item() == 7  # integer buffers come from b
    assert torch.equal(interpolate_state(a, b, 0.0)["w"], a["w"])
    with pytest.raises(ValueError, match="between 0 and 1"):
        interpolate_state(a, b, 1.5)
    with pytest.raises(ValueError, match="other tensors"):
        interpolate_state(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_state(a, {"w": torch.zeros(2), "n": b["n"]}, 0.5)


def test_published_merge_holds_the_interpolated_weights_and_its_lineage(store):
    version = merge_clips(str(store), NAME, "v1", "v2", 0.25, version="m25", log=lambda _: None)
    assert version == "m25"
    a, b, m = _weights(store, "v1"), _weights(store, "v2"), _weights(store, "m25")
    moved = 0
    for key, value in m.items():
        if value.is_floating_point():
            want = (0.75 * a[key].float() + 0.25 * b[key].float()).half()
            assert torch.allclose(value.float(), want.float(), atol=2e-3), key
            moved += int(not torch.equal(a[key], b[key]))
    assert moved > 10  # the parents really differ, so the check above could fail
    manifest = ModelStore(store).manifest(NAME, "m25")
    assert manifest["training"]["merge"] == {"from": [f"{NAME}@v1", f"{NAME}@v2"], "alpha": 0.25}
    assert "No test data" in manifest["centers"]["reference"]


def test_merge_at_an_end_is_that_parent(store):
    merge_clips(str(store), NAME, "v1", "v2", 1.0, version="m100", log=lambda _: None)
    b, m = _weights(store, "v2"), _weights(store, "m100")
    assert all(torch.equal(m[k], b[k]) for k in b)


def test_merge_refuses_two_architectures(tmp_path):
    _publish(tmp_path, 0, "v1")
    _publish(tmp_path, 1, "v2", embed_dim=16)
    with pytest.raises(StoreError, match="different architectures"):
        merge_clips(str(tmp_path), NAME, "v1", "v2", 0.5, log=lambda _: None)


def test_cli_merges_and_rejects_bad_arguments(store, capsys):
    rc = zsad(["--store", str(store), "synth", "merge-clip", "--base", f"{NAME}@v1", "--to", f"{NAME}@v2",
               "--alpha", "0.5", "--version", "m50"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"name": NAME, "version": "m50", "alpha": 0.5}
    with pytest.raises(SystemExit) as exc:
        zsad(["--store", str(store), "synth", "merge-clip", "--base", f"{NAME}@v1", "--to", f"{NAME}@v2",
              "--alpha", "2"])
    assert exc.value.code == 2 and "--alpha" in capsys.readouterr().err
    rc = zsad(["--store", str(store), "synth", "merge-clip", "--base", f"{NAME}@v1", "--to", f"{NAME}@v9",
               "--alpha", "0.5"])
    assert rc == 1 and "v9" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # versions are immutable: refused before any work
        zsad(["--store", str(store), "synth", "merge-clip", "--base", f"{NAME}@v1", "--to", f"{NAME}@v2",
              "--alpha", "0.5", "--version", "v1"])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err
