"""End to end on a tiny real model: detect -> persisted -> results/stats -> metrics; bad inputs; reload failures."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app

from .helpers import image_bytes, make_settings, wait_ready


@pytest.fixture(scope="module")
def served(api_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    store = tmp / "store"
    shutil.copytree(api_store, store)  # this module corrupts versions of its own copy
    app = create_app(make_settings(tmp, store, max_upload_bytes=2 * 1024 * 1024, heatmap_retention=50))
    with TestClient(app) as c:
        body = wait_ready(c)
        assert body["ready"], body
        yield c, app, store


def _metric(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_detect_persist_query_stats_metrics(served):
    c, _, _ = served
    before = c.get("/metrics").text
    r = c.post("/v1/detect", files={"file": ("part.png", image_bytes("PNG", (96, 64)), "image/png")},
               data={"line": "L1", "product": "widget", "heatmap": "png", "object": "screw"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["label"] in ("anomalous", "normal") and 0.0 <= d["score"] <= 1.0
    assert d["score"] == d["scores"]["combined"] and d["score_name"] == "combined"
    assert d["threshold_source"] == "fallback" and d["model"]["version"] == "v1"
    assert d["image"] == {"width": 96, "height": 64, "format": "PNG"}
    png = base64.b64decode(d["heatmap"]["png_base64"])
    assert Image.open(io.BytesIO(png)).size == (96, 64)
    assert isinstance(d["regions"], list)
    for stage in ("decode", "preprocess", "windows", "aggregate", "encode", "persist", "total"):
        assert d["timings_ms"][stage] is not None and d["timings_ms"][stage] >= 0, stage

    # persisted: by id, in the listing, in the stats, heatmap kept
    rec = c.get(f"/v1/results/{d['id']}").json()
    assert (rec["score"], rec["label"], rec["line"], rec["product"], rec["object"]) == (
        d["score"], d["label"], "L1", "widget", "screw")
    assert c.get(d["heatmap_url"]).content == png
    page = c.get("/v1/results", params={"line": "L1", "product": "widget"}).json()
    assert page["items"][0]["id"] == d["id"]
    stats = c.get("/v1/stats", params={"line": "L1", "window": "1h"}).json()
    assert stats["count"] >= 1 and stats["score"]["p50"] is not None

    # JSON grid and raw body
    r = c.post("/v1/detect", content=image_bytes("JPEG"), headers={"content-type": "image/jpeg"},
               params={"heatmap": "json", "line": "L1", "score": "fnn"})
    g = r.json()["heatmap"]
    assert r.json()["score_name"] == "fnn" and len(g["grid"]) == g["rows"] and len(g["grid"][0]) == g["cols"]

    after = c.get("/metrics").text
    assert _metric(after, 'zsad_predictions_total{') - _metric(before, 'zsad_predictions_total{') == 2
    assert _metric(after, 'zsad_requests_total{endpoint="/v1/detect",method="POST",status="200"}') == \
        _metric(before, 'zsad_requests_total{endpoint="/v1/detect",method="POST",status="200"}') + 2
    assert _metric(after, 'zsad_image_score_count{line="L1"}') >= 2
    assert _metric(after, 'zsad_inference_stage_duration_seconds_count{stage="windows"}') >= 1


def test_batch_and_calibration(served):
    c, _, _ = served
    files = [("files", (f"n{i}.png", image_bytes(seed=i), "image/png")) for i in range(5)]
    r = c.post("/v1/detect/batch", files=files, data={"product": "gadget"})
    assert r.status_code == 200 and r.json()["count"] == 5
    assert len({x["id"] for x in r.json()["results"]}) == 5
    r = c.post("/v1/calibrate/gadget", files=files, params={"target_frr": 0.2})
    assert r.status_code == 200, r.text
    cal = r.json()
    assert cal["stored"] and cal["distribution"]["n"] == 5 and cal["distribution"]["achieved_frr"] <= 0.2
    r = c.post("/v1/detect", content=image_bytes(seed=0), headers={"content-type": "image/png"},
               params={"product": "gadget"})
    assert r.json()["threshold"] == cal["threshold"] and r.json()["threshold_source"] == "product"
    assert r.json()["label"] == "normal"  # a calibration image is at or below its own threshold


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _huge_declared_png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _pixel_bomb() -> bytes:  # 64 MP of zeros, ~10 kB compressed
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(buf, "JPEG")
    return buf.getvalue()


BAD = {
    "truncated_jpeg": (lambda: image_bytes("JPEG", (200, 150))[:400], "image/jpeg", 400),
    "truncated_png": (lambda: image_bytes("PNG", (200, 150))[:300], "image/png", 400),
    "zero_bytes": (lambda: b"", "image/png", 400),
    "text_file": (lambda: b"hello, this is not an image\n" * 10, "image/png", 415),
    "wrong_content_type": (lambda: image_bytes(), "application/json", 415),
    "no_content_type": (lambda: image_bytes(), None, 415),
    "svg": (lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", 415),
    "pixel_bomb": (_pixel_bomb, "image/png", 413),
    "huge_declared_dimensions": (_huge_declared_png, "image/png", 413),
    "oversized_body": (lambda: b"\xff\xd8\xff" + b"\0" * (3 * 1024 * 1024), "image/jpeg", 413),
}
GOOD = {
    "animated_gif": (_animated_gif, "image/gif"),  # first frame, as the CLI reads it
    "tiff_16bit_gray": (lambda: image_bytes("TIFF", mode="I;16"), "image/tiff"),
    "cmyk_jpeg": (_cmyk_jpeg, "image/jpeg"),
    "palette_png": (lambda: image_bytes("PNG", mode="P"), "image/png"),
    "rgba_png": (lambda: image_bytes("PNG", mode="RGBA"), "image/png"),
    "gray_bmp": (lambda: image_bytes("BMP", mode="L"), "image/bmp"),
    "webp": (lambda: image_bytes("WEBP"), "image/webp"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_are_refused_with_4xx_json(served, name):
    c, _, _ = served
    make, ctype, status = BAD[name]
    data = make()
    headers = {"content-type": ctype} if ctype else {}
    r = c.post("/v1/detect", content=data, headers=headers)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"code", "message"} and err["message"]
    if ctype and ctype.startswith("image/") and name != "oversized_body":  # the same bytes as a multipart upload
        r = c.post("/v1/detect", files={"file": ("x", data, ctype)})
        assert r.status_code == status, (name, "multipart", r.text[:300])
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


@pytest.mark.parametrize("name", sorted(GOOD))
def test_unusual_but_valid_images_are_scored(served, name):
    c, _, _ = served
    make, ctype = GOOD[name]
    r = c.post("/v1/detect", content=make(), headers={"content-type": ctype}, params={"heatmap": "png"})
    assert r.status_code == 200, (name, r.text[:300])
    assert r.json()["heatmap"]["png_base64"]


def test_oversized_chunked_body_without_content_length(served):
    c, _, _ = served

    def chunks():
        yield b"\x89PNG\r\n\x1a\n"
        for _ in range(40):
            yield b"\0" * 65536

    r = c.post("/v1/detect", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert c.get("/readyz").status_code == 200


def test_failed_reloads_keep_the_old_model_serving(served):
    c, app, store = served
    from service.store import ModelStore

    ms = ModelStore(store)
    manifest = ms.manifest("default", "v1")
    fnn_bytes = (store / "default" / "v1" / "fnn.safetensors").read_bytes()
    clean = {k: v for k, v in manifest.items() if k not in ("name", "version", "files", "created_at")}
    ms.publish("default", {"fnn.safetensors": fnn_bytes}, clean, version="v2", make_current=False)
    (store / "default" / "v2" / "fnn.safetensors").write_bytes(fnn_bytes[:-8] + b"corrupt!")
    wrong_dim = json.loads(json.dumps(clean))
    wrong_dim["embed_dim"] = 999
    wrong_dim["fnn"]["layout"][0] = 999
    ms.publish("default", {"fnn.safetensors": fnn_bytes}, wrong_dim, version="v3", make_current=False)

    for version, status, code, words in (("v9", 404, "model_not_found", "not found"),
                                         ("v2", 422, "model_invalid", "checksum"),
                                         ("v3", 422, "model_invalid", "dimension")):
        r = c.post("/v1/models/reload", json={"version": version})
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"]
        assert "still serving default@v1" in r.json()["error"]["message"]
        assert c.get("/readyz").status_code == 200
        det = c.post("/v1/detect", content=image_bytes(), headers={"content-type": "image/png"})
        assert det.status_code == 200 and det.json()["model"]["version"] == "v1"
    info = c.get("/v1/models").json()["model"]
    assert info["version"] == "v1" and info["tta_views"] == 1  # the effective settings, not only the manifest
    metrics = c.get("/metrics").text
    assert 'zsad_model_reloads_total{outcome="failed"} 3.0' in metrics
    assert re.search(r'zsad_model_info\{[^}]*model="default",replica="[^"]+",version="v1"\} 1.0', metrics)

    # a good version swaps in
    ms.publish("default", {"fnn.safetensors": fnn_bytes}, {**clean, "tta": {"views": 2}}, version="v4",
               make_current=False)
    r = c.post("/v1/models/reload", json={"version": "v4"})
    assert r.status_code == 200 and r.json()["previous"]["version"] == "v1" and r.json()["current"]["version"] == "v4"
    det = c.post("/v1/detect", content=image_bytes(), headers={"content-type": "image/png"}).json()
    assert det["model"]["version"] == "v4"
    assert {m["name"]: m for m in c.get("/v1/models").json()["available"]}["default"]["versions"][-1] == "v4"
    assert c.get("/v1/models").json()["model"]["tta_views"] == 2  # the new version's recommendation
