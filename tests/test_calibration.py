"""One scoring path: `zsad train --calibration-images`, `POST /v1/calibrate` and `zsad evaluate` score an image alike.

The three paths are run with non-default settings (prompt temperature, combine weight, a non-square image under the
letterbox policy) so that a path that ignored one of them would give other scores.
"""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.calibration import fit_detector_calibration
from service.cli import main
from service.clip_backend import load_clip
from service.constants import SCORE_ALIASES, SCORE_NAMES
from service.detector import Detector, load_detector
from service.fnn import FNNConfig
from service.prompts import RandomWordConfig
from service.settings import Settings
from service.store import ModelStore
from service.train import TrainConfig, train_fnn_model
from tests.api.helpers import make_settings, wait_ready

N_IMAGES = 12
SETTINGS = {"prompt_temperature": 0.05, "combine_weight": 0.3, "precision": "fp32", "device": "cpu"}


@pytest.fixture(scope="module")
def calibrated(tiny_store, tmp_path_factory):
    """A store copy with an FNN calibrated on N_IMAGES non-square 'normal' images under SETTINGS."""
    tmp = tmp_path_factory.mktemp("calibration")
    store = tmp / "store"
    shutil.copytree(tiny_store[0], store)
    normal = tmp / "data" / "normal"
    anomalous = tmp / "data" / "anomalous"
    normal.mkdir(parents=True)
    anomalous.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(60, 160, (40, 56, 3), dtype=np.uint8)).save(normal / f"{i:02d}.png")
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(anomalous / f"{i:02d}.png")
    settings = Settings(model_store=store, **SETTINGS)
    backend = load_clip(tiny_store[1]["rn"], store, device="cpu", precision="fp32")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=150, seed=3), fnn=FNNConfig(max_epochs=2, seed=3), tta_views=2)
    paths = sorted(normal.iterdir())
    result = train_fnn_model(backend, cfg, ModelStore(store), "cal", calibration_images=paths, settings=settings)
    return store, tmp / "data", paths, result


def test_train_service_and_evaluate_give_identical_scores(calibrated, tmp_path, monkeypatch):
    store, data, paths, result = calibrated
    trained = result.calibration.scores  # what `zsad train --calibration-images` scored each image

    # POST /v1/calibrate: the distribution lists each image's score, in upload order.
    from service.api.app import create_app

    app = create_app(make_settings(tmp_path, store, model_name="cal", max_batch_size=16, **SETTINGS))
    served: dict[str, list[float]] = {}
    with TestClient(app) as client:
        assert wait_ready(client)["ready"]
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
        for name in SCORE_NAMES:
            r = client.post(f"/v1/calibrate/widget?store=false&reference=false&score={name}", files=files)
            assert r.status_code == 200, r.text
            served[name] = r.json()["distribution"]["scores"]

    # zsad evaluate on a folder dataset holding the same images.
    for key, value in SETTINGS.items():
        monkeypatch.setenv(f"ZSAD_{key.upper()}", str(value))
    out = tmp_path / "eval"
    assert main(["--store", str(store), "evaluate", str(data), "--layout", "folder", "--model", "cal", "--out",
                 str(out), "--no-pixel", "--cache", "", "--batch-size", "16", "--quiet"]) == 0
    rows = {r["path"]: r for r in csv.DictReader((out / "scores.csv").open())}

    for i, path in enumerate(paths):
        for name in SCORE_NAMES:
            assert served[name][i] == pytest.approx(trained[i][name], abs=1e-6), (name, path)
            assert float(rows[str(path)][SCORE_ALIASES[name]]) == pytest.approx(trained[i][name], abs=1e-6)


def test_calibration_records_the_settings_it_was_fitted_with(calibrated):
    store, _, _, result = calibrated
    fitted = result.manifest["calibration"]["fitted_with"]
    assert fitted == {"prompt_temperature": 0.05, "combine_weight": 0.3, "resize_policy": "letterbox",
                      "generic_object": "object", "tta_views": 2}
    same = load_detector(Settings(model_store=store, model_name="cal", **SETTINGS))
    assert same.calibration_drift() == {}
    other = load_detector(Settings(model_store=store, model_name="cal", **{**SETTINGS, "prompt_temperature": 0.07}))
    assert other.calibration_drift() == {"prompt_temperature": (0.05, 0.07)}


def test_calibrated_scores_put_the_quantile_of_normal_images_at_one_half(calibrated):
    """The definition of the calibration: a calibrated score of 0.5 is the 0.99 quantile of the reference logits."""
    store, _, paths, _ = calibrated
    det = load_detector(Settings(model_store=store, model_name="cal", **SETTINGS)).with_calibration(None)
    fit = fit_detector_calibration(det, paths, quantile=0.5)
    scores = np.array([s["fnn"] for s in fit.scores])
    assert np.median(scores) == pytest.approx(0.5, abs=1e-9)
    assert fit.threshold_advice["fnn"] == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ValueError, match="no calibration images"):
        fit_detector_calibration(det, [])


def test_detector_from_parts_and_given_anchors(tiny_backend):
    """A detector from a CLIP and an FNN without a store; text anchors supplied, not computed."""
    import torch
    import torch.nn.functional as F

    from service.fnn import FNN
    from service.scoring import PromptAnchors

    torch.manual_seed(0)
    dim = tiny_backend.embed_dim
    normal, anomalous = F.normalize(torch.randn(dim), dim=0), F.normalize(torch.randn(dim), dim=0)
    det = Detector.from_parts(tiny_backend, FNN(dim), Settings(device="cpu", precision="fp32"),
                              anchors={"object": PromptAnchors("object", normal, anomalous)})
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    emb = det.embed([image], heatmap=False)[0].global_emb
    f = F.normalize(emb.float(), dim=-1)
    expected = torch.softmax(torch.stack([f @ normal, f @ anomalous]) / 0.07, dim=0)[1]
    assert det.detect([image], heatmap=False)[0].scores["prompt"] == pytest.approx(float(expected), abs=1e-6)
    assert det.window_scales == (2, 3) and det.tta_views == 1
