"""Verdicts an operator can act on: `calibrated` in every answer, the `review` policy, a calibrated pixel threshold,
regions that agree with the label, and the CLI giving the service's label (tiny real model)."""
from __future__ import annotations

import base64
import io
import json
import sqlite3

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.cli import main
from service.db.engine import sqlite_url

from .helpers import image_bytes, make_settings, wait_ready


def _png(seed: int, size: tuple[int, int] = (64, 64), lo: int = 90, hi: int = 130) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(lo, hi, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(api_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verdicts")
    settings = make_settings(tmp, api_store)
    with TestClient(create_app(settings)) as c:
        assert wait_ready(c)["ready"]
        yield c, settings


def _check_regions_agree(body: dict) -> None:
    """Anomalous => at least one region; normal => none; the mask PNG is exactly the union of the regions."""
    regions = body["regions"]
    assert bool(regions) == (body["score"] > body["threshold"]), body
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["mask_png_base64"])))) > 0
    assert mask.shape == (body["image"]["height"], body["image"]["width"])
    assert int(mask.sum()) == sum(r["area_px"] for r in regions)
    inside = np.zeros_like(mask)
    for r in regions:
        inside[r["y0"]:r["y1"], r["x0"]:r["x1"]] = True
    assert not (mask & ~inside).any()
    if regions:
        assert regions[0]["max_score"] == max(r["max_score"] for r in regions)


def test_calibrated_false_before_and_true_after_calibration(client):
    c, _ = client
    before = c.post("/v1/detect", files={"file": ("a.png", _png(0), "image/png")},
                    data={"product": "bolt", "line": "L1", "heatmap": "png"}).json()
    assert before["calibrated"] is False and before["threshold_source"] in ("manifest", "fallback")
    _check_regions_agree(before)

    files = [("files", (f"{i}.png", _png(100 + i), "image/png")) for i in range(20)]
    cal = c.post("/v1/calibrate/bolt", files=files, params={"target_frr": 0.05})
    assert cal.status_code == 200, cal.text
    cal = cal.json()
    assert 0.0 <= cal["pixel_threshold"] <= 1.0 and cal["pixel_distribution"]["n"] == 20
    entry = c.get("/v1/thresholds/bolt").json()["entry"]
    assert entry["pixel_threshold"] == cal["pixel_threshold"] and entry["source"] == "calibration"

    seen = {"anomalous": 0, "normal": 0}
    for seed in range(8):  # normal-like and noisy parts: both verdicts, regions agreeing with each
        data = _png(200 + seed) if seed % 2 else image_bytes("PNG", (64, 64), seed=seed)
        after = c.post("/v1/detect", files={"file": ("b.png", data, "image/png")},
                       data={"product": "bolt", "line": "L1", "heatmap": "png"}).json()
        assert after["calibrated"] is True and after["threshold_source"] == "product"
        assert after["threshold"] == cal["threshold"]
        assert after["heatmap"]["pixel_threshold"] == cal["pixel_threshold"]
        assert after["heatmap"]["pixel_threshold_source"] == "product"
        _check_regions_agree(after)
        seen[after["label"]] += 1
        stored = c.get(f"/v1/results/{after['id']}").json()
        assert stored["calibrated"] is True and stored["label"] == after["label"]
    assert seen["normal"] >= 1

    # an admin sets the pixel threshold; setting only the image threshold later keeps it
    assert c.put("/v1/thresholds/bolt", json={"threshold": 0.9, "pixel_threshold": 0.33}).status_code == 200
    assert c.put("/v1/thresholds/bolt", json={"threshold": 0.8}).json()["entry"]["pixel_threshold"] == 0.33
    assert c.put("/v1/thresholds/bolt", json={"threshold": 0.8, "pixel_threshold": 1.5}).status_code == 422

    stats = c.get("/v1/stats", params={"line": "L1", "window": "1h"}).json()
    assert stats["uncalibrated"] == 1 and stats["uncalibrated_products"] == [{"product": "bolt", "count": 1}]
    metrics = c.get("/metrics").text
    assert 'calibrated="true"' in metrics and 'calibrated="false"' in metrics


def test_review_policy_labels_uncalibrated_products_review(api_store, tmp_path):
    settings = make_settings(tmp_path, api_store, uncalibrated="review")
    with TestClient(create_app(settings)) as c:
        assert wait_ready(c)["ready"]
        files = [("files", ("a.png", _png(1), "image/png")), ("files", ("b.png", _png(2), "image/png"))]
        r = c.post("/v1/detect/batch", files=files, data={"product": "nut"}).json()
        assert r["review"] == 2 and r["anomalous"] == 0
        assert {x["label"] for x in r["results"]} == {"review"} and not any(x["calibrated"] for x in r["results"])
        assert c.get("/v1/results", params={"label": "review"}).json()["items"]
        assert c.get("/v1/stats", params={"window": "1h"}).json()["review"] == 2
        assert c.put("/v1/thresholds/nut", json={"threshold": 0.99}).status_code == 200
        r = c.post("/v1/detect", files={"file": ("a.png", _png(1), "image/png")}, data={"product": "nut"}).json()
        assert (r["label"], r["calibrated"]) == ("normal", True)


def test_cli_gives_the_service_label_for_the_same_image_and_product(client, tmp_path, capsys):
    c, settings = client
    assert c.put("/v1/thresholds/washer", params={"line": "L2"}, json={"threshold": 0.4, "score": "fnn"}).status_code == 200
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        path.write_bytes(image_bytes("PNG", (48, 40), seed=30 + i))
        paths.append(path)
    served = {}
    for path in paths:
        for product, line in (("washer", "L2"), ("washer", None), ("unknown", None)):
            data = {"product": product, **({"line": line} if line else {})}
            body = c.post("/v1/detect", files={"file": (path.name, path.read_bytes(), "image/png")}, data=data).json()
            served[(path.name, product, line)] = body
    capsys.readouterr()
    for product, line in (("washer", "L2"), ("washer", None), ("unknown", None)):
        argv = ["--store", str(settings.model_store), "score", *map(str, paths), "--product", product,
                "--db", sqlite_url(settings.results_path), "--device", "cpu"] + (["--line", line] if line else [])
        assert main(argv) == 0
        for row in map(json.loads, capsys.readouterr().out.splitlines()):
            body = served[(row["path"].rsplit("/", 1)[1], product, line)]
            for key in ("label", "threshold", "threshold_source", "calibrated", "score_name"):
                assert row[key] == body[key], (key, row, body)
            assert row["score"] == pytest.approx(body["score"], abs=1e-6)
    assert (served[(paths[0].name, "washer", "L2")]["threshold_source"], served[(paths[0].name, "washer", "L2")]["calibrated"]
            ) == ("line", True)

    with pytest.raises(SystemExit) as exc:  # the service's name rule, argparse's exit code 2
        main(["score", str(paths[0]), "--product", "bad name"])
    assert exc.value.code == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    capsys.readouterr()
    assert main(["--store", str(settings.model_store), "score", str(paths[0]), "--thresholds", str(bad)]) == 1
    assert "cannot read thresholds file" in capsys.readouterr().err


def test_results_store_from_before_the_calibrated_column_is_upgraded(api_store, tmp_path):
    db = tmp_path / "results.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at FLOAT NOT NULL, line VARCHAR(64), "
                "product VARCHAR(64), model_name VARCHAR(64) NOT NULL, model_version VARCHAR(64) NOT NULL, "
                "score_name VARCHAR(16) NOT NULL, score FLOAT NOT NULL, label VARCHAR(16) NOT NULL, threshold FLOAT NOT "
                "NULL, threshold_source VARCHAR(16) NOT NULL, scores JSON NOT NULL, latency_ms FLOAT NOT NULL, "
                "object_name VARCHAR(64), filename VARCHAR(255), width INTEGER, height INTEGER)")
    con.execute("CREATE TABLE heatmaps (result_id INTEGER NOT NULL PRIMARY KEY REFERENCES results (id) ON DELETE CASCADE, "
                "png BLOB NOT NULL)")  # the first release made both tables (revision 0001)
    con.execute("INSERT INTO results (created_at, model_name, model_version, score_name, score, label, threshold, "
                "threshold_source, scores, latency_ms) VALUES (1.0, 'default', 'v1', 'combined', 0.2, 'normal', 0.5, "
                "'fallback', '{\"fnn\": 0.2, \"prompt\": 0.2, \"combined\": 0.2}', 3.0)")
    con.commit()
    con.close()
    with TestClient(create_app(make_settings(tmp_path, api_store, results_path=db))) as c:
        assert wait_ready(c)["ready"]
        assert c.get("/v1/results/1").json()["calibrated"] is None  # stored before the field existed
        r = c.post("/v1/detect", files={"file": ("a.png", _png(3), "image/png")}).json()
        assert c.get(f"/v1/results/{r['id']}").json()["calibrated"] is False
        assert c.get("/v1/stats", params={"window": "all"}).json()["uncalibrated"] == 1
