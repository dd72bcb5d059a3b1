"""The real Triton client (`tritonclient.http.InferenceServerClient`) against a real server (`zsad serve` in a
subprocess, tiny real model): health, metadata and readiness calls, and JSON and binary inference that score an image
exactly as /v1/detect does."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .helpers import Server, image_bytes

IMAGE = image_bytes("PNG", (80, 60), seed=3)


def _input(binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [1], "BYTES")
    data = [IMAGE] if binary else [base64.b64encode(IMAGE).decode()]  # JSON: BYTES elements are text, so base64
    tensor.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)
    return tensor


def test_tritonclient_json_and_binary_infer_match_v1_detect(api_store, tmp_path):
    env = {"ZSAD_MODEL_STORE": str(api_store), "ZSAD_DEVICE": "cpu", "ZSAD_PRECISION": "fp32",
           "ZSAD_RESULTS_PATH": str(tmp_path / "results.sqlite"), "ZSAD_THRESHOLDS_PATH": str(tmp_path / "t.json"),
           "ZSAD_TORCH_THREADS": "1", "ZSAD_API_KEYS_READ": '["rk"]'}
    server = Server(env, tmp_path / "server.log").start()
    key = {"X-API-Key": "rk"}
    try:
        # tritonclient adds its own headers to the dict it is given: each call gets a fresh copy
        client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("zsad", headers=dict(key)) and not client.is_model_ready("nope", headers=dict(key))
        assert client.get_server_metadata(headers=dict(key))["extensions"] == ["binary_tensor_data"]
        meta = client.get_model_metadata("zsad", headers=dict(key))
        version = meta["versions"][0]
        assert client.get_model_metadata("zsad", version, headers=dict(key)) == meta
        assert meta["inputs"][0]["datatype"] == "BYTES" and {o["name"] for o in meta["outputs"]} >= {
            "score", "label", "threshold", "calibrated", "anomaly_map"}

        v1 = httpx.post(f"{server.url}/v1/detect", content=IMAGE, params={"line": "L1"},
                        headers={"content-type": "image/png", **key}).json()
        outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("score", "label", "threshold")]
        as_json = client.infer("zsad", [_input(False)], outputs=outputs, parameters={"line": "L1"}, headers=dict(key))
        as_binary = client.infer("zsad", [_input(True)], model_version=version, parameters={"line": "L1"}, headers=dict(key))
        assert "binary_data_size" not in str(as_json.get_response())
        assert "binary_data_size" in str(as_binary.get_response())
        for result in (as_json, as_binary):
            assert abs(float(result.as_numpy("score")[0]) - v1["score"]) <= 1e-6, (result.get_response(), v1)
            label = result.as_numpy("label")[0]
            assert (label.decode() if isinstance(label, bytes) else label) == v1["label"]
            assert abs(float(result.as_numpy("threshold")[0]) - v1["threshold"]) <= 1e-6
        rid = int(as_binary.as_numpy("result_id")[0])
        assert httpx.get(f"{server.url}/v1/results/{rid}", headers=dict(key)).json()["line"] == "L1"  # same history

        mapped = client.infer("zsad", [_input(True)], parameters={"heatmap": True}, headers=dict(key))
        assert mapped.as_numpy("anomaly_map").ndim == 3 and mapped.as_numpy("anomaly_map").shape[0] == 1

        with pytest.raises(InferenceServerException) as info:  # OIP's error shape: the client shows the message
            client.infer("nope", [_input(True)], headers=dict(key))
        assert "unknown model 'nope'" in info.value.message() and info.value.status() == "404"
        with pytest.raises(InferenceServerException) as info:
            client.infer("zsad", [_input(True)])
        assert info.value.message().startswith("missing API key") and info.value.status() == "401"
        client.close()
    finally:
        server.stop()
