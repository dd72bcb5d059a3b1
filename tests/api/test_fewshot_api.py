"""Few-shot mode through the API: calibrate builds the memory (or not), detect uses it, thresholds show it, a reload to
another model makes it stale, deleting the product removes it; and `zsad score --product` reads the same memory."""
from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db.engine import database_url
from service.fewshot import DENSE_SQUASH
from tests.conftest import publish_tiny_model

from .helpers import image_bytes, make_settings, wait_ready


@pytest.fixture(scope="module")
def served(api_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fewshot-api")
    store = tmp / "store"
    shutil.copytree(api_store, store)
    settings = make_settings(tmp, store).model_copy(update={"reference_dense": True})  # the opt-in dense bank too
    with TestClient(create_app(settings)) as c:
        assert wait_ready(c)["ready"]
        yield c, tmp, store, settings


def _files(n: int, offset: int = 0):
    return [("files", (f"g{i}.png", image_bytes(seed=100 + offset + i), "image/png")) for i in range(n)]


def _memories(c) -> list:
    return c.app.state.zsad.references.store.list()


def _detect(c, seed: int, **params):
    r = c.post("/v1/detect", content=image_bytes(seed=seed), headers={"content-type": "image/png"}, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_few_shot_lifecycle(served, capsys):
    c, tmp, store, settings = served
    r = c.post("/v1/calibrate/nut", files=_files(6), params={"target_frr": 0.2, "reference": "true"})
    assert r.status_code == 200, r.text
    cal = r.json()
    assert cal["mode"] == "few_shot" and cal["shots"] == 6 and cal["reference"]["rows"]["patches"] > 0
    assert "leave-one-out" in cal["distribution"]["fit"] and cal["distribution"]["n"] == 6
    assert _memories(c) == [("nut", None)]  # a database row next to the threshold (service/db/memories.py)

    body = _detect(c, 1, product="nut")
    assert body["mode"] == "few_shot" and body["shots"] == 6 and body["reference"]["stale"] is False
    assert body["threshold_source"] == "product" and body["threshold"] == cal["threshold"]
    zero = _detect(c, 1)
    assert zero["mode"] == "zero_shot" and zero["reference"] is None
    assert zero["scores"] != body["scores"]
    # a CNN tower's memory has the dense bank, and a few-shot map is on its finer grid
    assert cal["reference"]["rows"]["dense"] > 0 and cal["reference"]["dense_scale"] > 0
    assert cal["reference"]["dense_squash"] == DENSE_SQUASH  # the squash its thresholds were fitted with
    few_grid = _detect(c, 1, product="nut", heatmap="json")["heatmap"]
    zero_grid = _detect(c, 1, heatmap="json")["heatmap"]
    assert few_grid["rows"] == cal["reference"]["dense_grid"][0] > zero_grid["rows"]
    assert len(few_grid["grid"]) == few_grid["rows"] and len(few_grid["grid"][0]) == few_grid["cols"]
    # the results history keeps how each verdict was made (revision 0005)
    stored = {r["id"]: r for r in c.get("/v1/results", params={"limit": 10}).json()["items"]}
    assert (stored[body["id"]]["mode"], stored[body["id"]]["shots"]) == ("few_shot", 6)
    assert (stored[zero["id"]]["mode"], stored[zero["id"]]["shots"]) == ("zero_shot", 0)

    listed = c.get("/v1/thresholds").json()["products"]["nut"]
    assert listed["mode"] == "few_shot" and listed["shots"] == 6 and listed["reference"]["stale"] is False
    assert c.get("/v1/thresholds/nut").json()["entry"]["reference"]["shots"] == 6

    # The CLI scores the same image against the same memory (no service involved).
    from service.cli import main

    img = tmp / "one.png"
    img.write_bytes(image_bytes(seed=1))
    db = database_url(settings)
    assert main(["--store", str(store), "score", str(img), "--product", "nut", "--db", db, "--device", "cpu"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["mode"] == "few_shot" and line["shots"] == 6
    assert abs(line["combined"] - body["scores"]["combined"]) < 1e-5
    assert (line["label"], line["threshold"], line["calibrated"]) == (body["label"], body["threshold"], True)

    # A line calibrated with reference=false keeps only a threshold; the product's memory still serves the line.
    r = c.post("/v1/calibrate/nut", files=_files(4, 10), params={"target_frr": 0.2, "line": "L1", "reference": "false"})
    assert r.status_code == 200 and r.json()["mode"] == "zero_shot" and r.json()["shots"] == 0
    body = _detect(c, 2, product="nut", line="L1")
    assert body["mode"] == "few_shot" and body["threshold_source"] == "product"  # a zero-shot threshold is not applied

    # Reloading another model makes the memory stale: zero-shot, said so, and its few-shot threshold not applied.
    version = publish_tiny_model(store, seed=1)
    assert c.post("/v1/models/reload", json={"version": version}).status_code == 200
    body = _detect(c, 1, product="nut")
    assert body["mode"] == "zero_shot" and body["reference"]["stale"] is True and "stale" in body["reference"]["note"]
    assert body["threshold_source"] not in ("product", "line")
    assert c.get("/v1/thresholds").json()["products"]["nut"]["reference"]["stale"] is True

    # Re-calibrating re-embeds; deleting the product removes threshold and memory together.
    assert c.post("/v1/calibrate/nut", files=_files(3), params={"reference": "true"}).json()["mode"] == "few_shot"
    assert _detect(c, 1, product="nut")["mode"] == "few_shot"
    assert c.delete("/v1/thresholds/nut").status_code == 204
    assert _memories(c) == []
    assert _detect(c, 1, product="nut")["mode"] == "zero_shot"


def test_few_shot_calibration_refusals(served):
    c, *_ = served
    r = c.post("/v1/calibrate/bolt", files=_files(1), params={"reference": "true"})
    assert r.status_code == 400 and "at least 2" in r.json()["error"]["message"]
    r = c.post("/v1/calibrate/bolt", files=_files(2), params={"store": "false", "reference": "true"})
    assert r.status_code == 200 and r.json()["mode"] == "few_shot" and not r.json()["stored"]
    assert "bolt" not in c.get("/v1/thresholds").json()["products"]
    assert _detect(c, 3, product="bolt")["mode"] == "zero_shot"  # store=false stores no memory either


def test_calibration_defaults_to_few_shot_from_two_images_and_delete_honours_if_match(served):
    c, tmp, *_ = served
    r = c.post("/v1/calibrate/gear", files=_files(1), params={"target_frr": 0.2})  # one image: zero-shot by default
    assert r.status_code == 200 and r.json()["mode"] == "zero_shot" and r.json()["reference"] is None
    assert ("gear", None) not in _memories(c)
    assert c.get("/v1/thresholds/gear").json()["entry"]["mode"] == "zero_shot"
    assert c.get("/v1/thresholds/gear/calibrations").json()[0]["details"]["mode"] == "zero_shot"
    r = c.post("/v1/calibrate/gear", files=_files(3), params={"target_frr": 0.2})  # no reference=: few-shot
    assert r.status_code == 200 and r.json()["mode"] == "few_shot" and r.json()["shots"] == 3
    assert ("gear", None) in _memories(c) and _detect(c, 5, product="gear")["mode"] == "few_shot"
    r = c.post("/v1/calibrate/gear", files=_files(3), params={"target_frr": 0.2, "reference": "false"})
    assert r.status_code == 200 and r.json()["mode"] == "zero_shot"
    assert ("gear", None) not in _memories(c)  # reference=false drops the memory with the new zero-shot threshold

    r = c.post("/v1/calibrate/gear", files=_files(3), params={"target_frr": 0.2, "reference": "true"})
    assert r.status_code == 200 and r.json()["mode"] == "few_shot"
    etag = c.get("/v1/thresholds/gear").headers["etag"]
    assert c.delete("/v1/thresholds/gear", headers={"If-Match": '"999"'}).status_code == 409
    assert ("gear", None) in _memories(c)  # a refused delete removes nothing
    assert c.delete("/v1/thresholds/gear", headers={"If-Match": etag}).status_code == 204
    assert ("gear", None) not in _memories(c)


def test_dense_bank_is_chosen_per_calibration(served):
    c, *_ = served  # the served setting is reference_dense=true
    r = c.post("/v1/calibrate/valve", files=_files(3), params={"target_frr": 0.2, "dense": "false"})
    assert r.status_code == 200 and r.json()["mode"] == "few_shot"
    ref = r.json()["reference"]
    assert "dense" not in ref["rows"] and ref["dense_grid"] is None and ref["dense_note"] == "off"
    zero_rows = _detect(c, 2, heatmap="json")["heatmap"]["rows"]
    assert _detect(c, 2, product="valve", heatmap="json")["heatmap"]["rows"] == zero_rows  # WinCLIP+'s own grid
    r = c.post("/v1/calibrate/valve", files=_files(3), params={"target_frr": 0.2, "dense": "true"})
    assert r.status_code == 200 and r.json()["reference"]["rows"]["dense"] > 0
    assert _detect(c, 2, product="valve", heatmap="json")["heatmap"]["rows"] > zero_rows
    # contradictions and impossibilities are clear errors that store nothing new
    before = c.get("/v1/thresholds/valve").headers["etag"]
    r = c.post("/v1/calibrate/valve", files=_files(3), params={"dense": "true", "reference": "false"})
    assert r.status_code == 400 and "reference=false" in r.json()["error"]["message"]
    r = c.post("/v1/calibrate/valve", files=_files(1), params={"dense": "true"})
    assert r.status_code == 400 and "at least 2" in r.json()["error"]["message"]
    assert c.get("/v1/thresholds/valve").headers["etag"] == before
    # and with the setting off (the shipped default), dense=true still makes a bank
    state = c.app.state.zsad
    served_settings = state.settings
    state.settings = served_settings.model_copy(update={"reference_dense": False})
    try:
        r = c.post("/v1/calibrate/valve", files=_files(3), params={"target_frr": 0.2})
        assert r.status_code == 200 and r.json()["reference"]["dense_note"] == "off"
        r = c.post("/v1/calibrate/valve", files=_files(3), params={"target_frr": 0.2, "dense": "true"})
        assert r.status_code == 200 and r.json()["reference"]["rows"]["dense"] > 0
        assert _detect(c, 2, product="valve", heatmap="json")["heatmap"]["rows"] > zero_rows
    finally:
        state.settings = served_settings
    assert c.delete("/v1/thresholds/valve").status_code == 204


def test_dense_true_on_a_vit_tower_is_a_clear_error_that_stores_nothing(tiny_store, tmp_path):
    from service.clip_backend import load_clip
    from service.fnn import FNNConfig
    from service.prompts import RandomWordConfig
    from service.store import ModelStore
    from service.train import TrainConfig, train_fnn_model

    root, specs = tiny_store
    store = tmp_path / "store"
    shutil.copytree(root, store)
    backend = load_clip(specs["vit"], store, device="cpu", precision="fp32")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=200, seed=0), fnn=FNNConfig(max_epochs=2, seed=0))
    train_fnn_model(backend, cfg, ModelStore(store), name="default")
    with TestClient(create_app(make_settings(tmp_path, store))) as c:
        assert wait_ready(c)["ready"]
        r = c.post("/v1/calibrate/x", files=_files(3), params={"dense": "true"})
        assert r.status_code == 422 and "not a CNN tower" in r.json()["error"]["message"], r.text
        assert _memories(c) == [] and "x" not in c.get("/v1/thresholds").json()["products"]
        r = c.post("/v1/calibrate/x", files=_files(3), params={"target_frr": 0.2})  # WinCLIP+ without a bank
        assert r.status_code == 200 and r.json()["mode"] == "few_shot" and "dense" not in r.json()["reference"]["rows"]
