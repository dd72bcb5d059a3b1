"""service/api/oip.py without HTTP: Triton's BYTES serialisation, parsing inference requests (JSON and binary), and
answers that tritonclient's own parser reads back."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from tritonclient.http import InferResult
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from service.api.oip import (
    DEFAULT_OUTPUTS,
    OUTPUTS,
    TensorError,
    deserialize_bytes,
    encode_response,
    model_metadata,
    parse_infer_request,
    result_tensors,
    serialize_bytes,
)

IMAGES = [b"\x89PNG first", b"", b"\xff\xd8\xff third" * 50]


def test_bytes_serialisation_is_tritons():
    ours = serialize_bytes(IMAGES)
    assert ours == serialize_byte_tensor(np.array(IMAGES, dtype=object)).item()
    assert list(deserialize_bytes_tensor(ours)) == IMAGES == deserialize_bytes(ours, 3)


@pytest.mark.parametrize("raw, count, message", [
    (serialize_bytes(IMAGES), 2, "more than the 2"),
    (serialize_bytes(IMAGES), 4, "holds 3 element(s)"),
    (serialize_bytes(IMAGES)[:-1], 3, "claims"),
    (serialize_bytes(IMAGES) + b"\x01\x00", 3, "more than the 3"),
    (b"\x05\x00", 1, "ends inside the length"),
    ((2**32 - 1).to_bytes(4, "little") + b"x", 1, "claims 4294967295 bytes"),
])
def test_malformed_bytes_tensors_are_refused(raw, count, message):
    with pytest.raises(TensorError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deserialize_bytes(raw, count)


def _binary(images: list[bytes], **request) -> tuple[bytes, str]:
    raw = serialize_bytes(images)
    doc = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                       "parameters": {"binary_data_size": len(raw)}}], **request}
    head = json.dumps(doc).encode()
    return head + raw, str(len(head))


def _json(images: list[bytes], **request) -> bytes:
    data = [base64.b64encode(b).decode() for b in images]
    return json.dumps({"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": data}],
                       **request}).encode()


def test_json_and_binary_requests_carry_the_same_images_and_options():
    params = {"product": "widget", "line": "L1", "heatmap": True, "binary_data_output": True}
    body, n = _binary(IMAGES[:2], id="r1", parameters=params)
    a = parse_infer_request(body, n, 16)
    b = parse_infer_request(_json(IMAGES[:2], id="r1", parameters=params), None, 16)
    assert a == b
    assert a.images == IMAGES[:2] and a.id == "r1"
    assert a.options == {"product": "widget", "line": "L1", "heatmap": "json"}
    assert a.outputs == [(name, True) for name in (*DEFAULT_OUTPUTS, "anomaly_map")]


def test_requested_outputs_choose_names_order_and_form():
    outputs = [{"name": "label", "parameters": {"binary_data": True}}, {"name": "score"}]
    r = parse_infer_request(_json(IMAGES[:1], outputs=outputs), None, 16)
    assert r.outputs == [("label", True), ("score", False)] and r.options["heatmap"] == "none"
    r = parse_infer_request(_json(IMAGES[:1], outputs=[{"name": "anomaly_map"}]), None, 16)
    assert r.options["heatmap"] == "json"  # asking for the map turns the heatmap on
    nested = json.dumps({"inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES",
                                     "data": [[base64.b64encode(b).decode()] for b in IMAGES[:2]]}]}).encode()
    assert parse_infer_request(nested, None, 16).images == IMAGES[:2]


@pytest.mark.parametrize("body, header, message", [
    (b"not json", None, "invalid inference request"),
    (b'{"inputs": "x"}', None, "at inputs"),
    (_json(IMAGES[:1]).replace(b'"image"', b'"img"'), None, "one input 'image'"),
    (_json(IMAGES[:1]).replace(b'"BYTES"', b'"FP32"'), None, "must be BYTES"),
    (_json(IMAGES[:3]), None, "at most 2 image"),
    (_json(IMAGES[:1]).replace(b"[1]", b"[2]"), None, "has 1 element(s), its shape says 2"),
    (_json(IMAGES[:1]).replace(b"[1]", b"[0]"), None, "holds no image"),
    (_json(IMAGES[:1]).replace(b"[1]", b"[1, 3]"), None, "shape [n]"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}).encode(), None,
     "not valid base64"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [3]}]}).encode(), None,
     "expected a base64 string"),
    (_json(IMAGES[:1], parameters={"heatmap": "yes"}), None, "'heatmap' must be true or false"),
    (_json(IMAGES[:1], parameters={"product": 3}), None, "'product' must be a string"),
    (_json(IMAGES[:1], outputs=[{"name": "scores"}]), None, "unknown output 'scores'"),
    (_json(IMAGES[:1], outputs=[{"name": "score"}, {"name": "score"}]), None, "requested twice"),
    (_json(IMAGES[:1]), "12x", "must be an integer"),
    (_json(IMAGES[:1]), "100000", "outside the body"),
    (_json(IMAGES[:1]) + b"junk", str(len(_json(IMAGES[:1]))), "no input has binary_data_size"),
    (_binary(IMAGES[:1])[0], None, "invalid inference request"),  # binary body without the header
    (_binary(IMAGES[:1])[0] + b"x", _binary(IMAGES[:1])[1], "does not match"),
])
def test_bad_requests_are_refused_with_a_clear_message(body, header, message):
    with pytest.raises(TensorError) as info:
        parse_infer_request(body, header, 2)
    assert message in str(info.value), str(info.value)


RESULTS = [
    {"id": 7, "score": 0.7340000123, "label": "anomalous", "threshold": 0.61, "calibrated": True,
     "heatmap": {"grid": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]}},
    {"id": 8, "score": 0.25, "label": "normal", "threshold": 0.61,
     "heatmap": {"grid": [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]}},
]


@pytest.mark.parametrize("binary", [False, True])
def test_answers_read_back_with_tritonclient(binary):
    names = [*DEFAULT_OUTPUTS, "anomaly_map"]
    tensors = result_tensors(RESULTS, names)
    body, header = encode_response("zsad", "v3", "r1", tensors, {n: binary for n in names}, {"score_name": "fnn"})
    assert (header is not None) == binary
    result = InferResult.from_response_body(body, header_length=header)
    assert result.get_response()["model_version"] == "v3" and result.get_response()["id"] == "r1"
    assert np.allclose(result.as_numpy("score"), [0.734, 0.25], atol=1e-7)
    assert result.as_numpy("score").dtype == np.float32
    assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")] == ["anomalous", "normal"]
    assert result.as_numpy("calibrated").tolist() == [True, False]
    assert result.as_numpy("result_id").tolist() == [7, 8]
    assert result.as_numpy("anomaly_map").shape == (2, 2, 3) and result.as_numpy("anomaly_map")[1, 1, 2] == 1.0


def test_model_metadata_names_every_output_and_the_base64_json_form():
    meta = model_metadata("zsad", "v3")
    assert meta["versions"] == ["v3"] and [o["name"] for o in meta["outputs"]] == list(OUTPUTS)
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": "base64"}}]
