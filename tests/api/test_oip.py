"""The Open Inference Protocol (v2) endpoints in process, with a controllable fake detector: requests built and
answers parsed by tritonclient's own code, the /v1/detect pipeline behind them (thresholds, history, metrics), the
read scope, and errors in OIP's shape."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.http import InferResult
from tritonclient.http._utils import _get_inference_request

from service.api.app import create_app

from .helpers import FakeDetector, image_bytes, make_settings, wait_ready

PNG = {"content-type": "image/png"}
INFER = "/v2/models/zsad/infer"


def _app(tmp_path, detector=None, **overrides):
    det = detector or FakeDetector()
    settings = make_settings(tmp_path, tmp_path / "no-store", **overrides)
    return create_app(settings, loader=lambda s, name=None, version=None: det)


@pytest.fixture
def client(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        wait_ready(c)
        yield c


def _flat_png(grey: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (grey, grey, grey)).save(buf, format="PNG")
    return buf.getvalue()


def _request(images: list[bytes], binary: bool, outputs: list[str] | None = None, parameters=None,
             binary_out: bool | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers tritonclient's InferenceServerClient.infer sends."""
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    else:
        tensor.set_data_from_numpy(np.array([base64.b64encode(b).decode() for b in images], dtype=object),
                                   binary_data=False)
    wanted = [triton.InferRequestedOutput(n, binary_data=binary if binary_out is None else binary_out)
              for n in outputs] if outputs else None
    body, json_size = _get_inference_request([tensor], "req-1", wanted, 0, False, False, 0, None, parameters)
    return body, ({"Inference-Header-Content-Length": str(json_size)} if json_size is not None else {})


def _result(response) -> InferResult:
    assert response.status_code == 200, response.text
    header = response.headers.get("inference-header-content-length")
    return InferResult.from_response_body(response.content, header_length=int(header) if header else None)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_scores_like_v1_detect_and_records_history(client, binary):
    img = [_flat_png(220), _flat_png(30)]  # the fake scores brightness: anomalous, normal
    assert client.put("/v1/thresholds/widget", json={"threshold": 0.45, "score": "fnn"}).status_code == 200
    v1 = [client.post("/v1/detect", content=b, headers=PNG, params={"product": "widget"}).json() for b in img]
    body, headers = _request(img, binary, ["score", "label", "threshold", "result_id", "anomaly_map"],
                             {"product": "widget", "line": "L7"})
    response = client.post(INFER, content=body, headers=headers)
    assert response.headers["content-type"].startswith("application/octet-stream" if binary else "application/json")
    result = _result(response)
    assert np.allclose(result.as_numpy("score"), [r["score"] for r in v1], atol=1e-6, rtol=0)
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
    assert labels == [r["label"] for r in v1] and set(labels) == {"normal", "anomalous"}  # the product threshold
    assert result.as_numpy("threshold").tolist() == pytest.approx([0.45, 0.45])
    assert result.get_response()["parameters"] == {"score_name": "fnn", "threshold_source": "product"}
    assert result.as_numpy("anomaly_map").shape[0] == 2 and result.get_response()["id"] == "req-1"
    ids = result.as_numpy("result_id").tolist()
    for rid in ids:  # the same result history as /v1/detect
        stored = client.get(f"/v1/results/{rid}").json()
        assert stored["line"] == "L7" and stored["product"] == "widget"
    metrics = client.get("/metrics").text  # the admin-set product threshold: calibrated
    assert 'zsad_predictions_total{calibrated="true",label="anomalous",line="L7",product="widget"} 1.0' in metrics
    assert 'endpoint="/v2/models/{model_name}/infer",method="POST",status="200"' in metrics


def test_default_outputs_follow_binary_data_output(client):
    body, headers = _request([image_bytes()], binary=True)  # no outputs named: tritonclient asks for binary
    response = client.post(INFER, content=body, headers=headers)
    result = _result(response)
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["score", "label", "threshold", "calibrated", "result_id"]
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    body, headers = _request([image_bytes()], binary=False, outputs=["score"], parameters={"heatmap": True})
    doc = client.post(INFER, content=body, headers=headers).json()
    assert [o["name"] for o in doc["outputs"]] == ["score"] and isinstance(doc["outputs"][0]["data"][0], float)


def test_metadata_ready_and_versions(client):
    assert client.get("/v2").json() == {"name": "zsad", "version": client.app.version, "extensions": ["binary_tensor_data"]}
    meta = client.get("/v2/models/zsad").json()
    assert meta["versions"] == ["v1"] and meta["inputs"][0]["parameters"] == {"content_type": "base64"}
    assert client.get("/v2/models/zsad/versions/v1").json() == meta
    assert client.get("/v2/models/zsad/ready").json() == {"name": "zsad", "ready": True}
    assert client.get("/v2/models/zsad/versions/v1/ready").status_code == 200
    for path in ("/v2/models/other", "/v2/models/zsad/versions/v9", "/v2/models/zsad/versions/v9/ready"):
        r = client.get(path)
        assert r.status_code == 404 and isinstance(r.json()["error"], str), path
    body, headers = _request([image_bytes()], binary=True)
    r = client.post("/v2/models/zsad/versions/v9/infer", content=body, headers=headers)
    assert r.status_code == 404 and "v9" in r.json()["error"]
    assert _result(client.post("/v2/models/zsad/versions/v1/infer", content=body, headers=headers))


def test_the_model_name_is_a_setting(tmp_path):
    with TestClient(_app(tmp_path, oip_model_name="anomaly")) as c:
        wait_ready(c)
        assert c.get("/v2/models/anomaly/ready").status_code == 200
        assert c.get("/v2/models/zsad/ready").status_code == 404


def test_errors_take_the_oip_shape(tmp_path):
    with TestClient(_app(tmp_path, api_keys_read=["rk"], max_upload_bytes=4096, batch_max_images=2)) as c:
        wait_ready(c)
        key = {"X-API-Key": "rk"}
        body, headers = _request([_flat_png(100)], binary=True)
        r = c.post(INFER, content=body, headers=headers)
        assert r.status_code == 401 and r.json() == {"error": r.json()["error"], "code": "unauthorized"}
        assert c.get("/v2/models/zsad", headers=key).status_code == 200 and c.get("/v2/models/zsad").status_code == 401
        assert c.get("/v2/health/ready").status_code == 200  # probes need no key
        assert _result(c.post(INFER, content=body, headers={**headers, **key}))

        body, headers = _request([b"<svg xmlns='http://www.w3.org/2000/svg'/>"], binary=True)
        r = c.post(INFER, content=body, headers={**headers, **key})
        assert r.status_code == 415 and "SVG" in r.json()["error"] and r.json()["code"] == "unsupported_media_type"
        body, headers = _request([_flat_png(100)] * 3, binary=True)
        r = c.post(INFER, content=body, headers={**headers, **key})
        assert r.status_code == 400 and r.json()["code"] == "too_many_files"
        body, headers = _request([image_bytes(size=(200, 200))], binary=True)
        r = c.post(INFER, content=body, headers={**headers, **key})
        assert r.status_code == 413 and isinstance(r.json()["error"], str)
        body, headers = _request([_flat_png(100)], binary=True, parameters={"line": "no spaces allowed"})
        r = c.post(INFER, content=body, headers={**headers, **key})
        assert r.status_code == 400 and r.json()["error"].startswith("parameters.line")
        r = c.post(INFER, content=b"{}", headers={"Content-Encoding": "gzip", **key})
        assert r.status_code == 415 and "uncompressed" in r.json()["error"]
        r = c.get("/v2/nothing/here", headers=key)
        assert r.status_code == 404 and isinstance(r.json()["error"], str)
        # /v1 keeps its own shape
        assert isinstance(c.get("/v1/results").json()["error"], dict)


def test_not_ready_is_503_on_model_routes(tmp_path):
    def failing(settings, name=None, version=None):
        from service.detector import ModelLoadError

        raise ModelLoadError("no model here")

    settings = make_settings(tmp_path, tmp_path / "no-store")
    with TestClient(create_app(settings, loader=failing)) as c:
        assert wait_ready(c)["status"] == "failed"
        r = c.get("/v2/models/zsad/ready")
        assert r.status_code == 503 and r.json()["ready"] is False and "no model here" in r.json()["error"]
        body, headers = _request([image_bytes()], binary=True)
        r = c.post(INFER, content=body, headers=headers)
        assert r.status_code == 503 and r.json()["code"] == "model_not_ready" and "Retry-After" in r.headers
