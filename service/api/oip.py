"""Open Inference Protocol (v2) tensors: the `image` input of an inference request in, detect results out.

Plain functions and no HTTP (`routes/v2.py` does the HTTP and hands the images to the same detect pipeline as
/v1/detect). The REST protocol (https://kserve.github.io/website/, "Open Inference Protocol") has two wire forms,
and a request may mix them:

* JSON: the body is the request JSON. BYTES elements must be text there, so each image is its base64 (the model
  metadata says so: input parameter `content_type: base64`).
* Binary tensor extension (what Triton's clients send with `binary_data=True`): the header
  `Inference-Header-Content-Length: N` says the body's first N bytes are the request JSON; the rest are the raw
  tensors of the inputs whose `parameters.binary_data_size` gives their length, in input order. A BYTES tensor is its
  elements one after the other, each a 4-byte little-endian length followed by that many bytes (Triton's BYTES
  serialisation), so an image travels as its file bytes.

The answer is binary for the outputs that ask for it (a requested output's `parameters.binary_data`, or the request's
`binary_data_output` for all outputs) and JSON otherwise. Everything the client controls is checked against what was
received (sizes, counts, shapes) before it is used, and the image count is bounded before anything is decoded.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from .oip_schemas import InferRequest

INPUT = "image"
# name -> (datatype, shape); -1 is the batch (and the map's rows and columns)
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "score": ("FP32", [-1]),
    "label": ("BYTES", [-1]),
    "threshold": ("FP32", [-1]),
    "calibrated": ("BOOL", [-1]),
    "result_id": ("INT64", [-1]),
    "anomaly_map": ("FP32", [-1, -1, -1]),
}
DEFAULT_OUTPUTS = ("score", "label", "threshold", "calibrated", "result_id")  # + anomaly_map with `heatmap: true`
TEXT_PARAMETERS = ("product", "line", "object", "score")  # request parameters passed on as detect options
LITTLE_ENDIAN = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}
EXTENSIONS = ("binary_tensor_data",)


class TensorError(ValueError):
    """The request is not a valid inference request for this model: the caller's fault."""

    def __init__(self, message: str, code: str = "invalid_inference_request"):
        super().__init__(message)
        self.code = code


@dataclass
class ParsedRequest:
    id: str | None
    images: list[bytes]
    outputs: list[tuple[str, bool]]  # (name, binary) in the order the answer lists them
    options: dict[str, Any]  # detect options: the fields of schemas.DetectParams


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: Any  # numpy array (numbers, bools) or list[bytes] (BYTES)


# --- BYTES serialisation ------------------------------------------------------------------------------------------
def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """Triton's BYTES tensor: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def deserialize_bytes(raw: bytes | memoryview, count: int) -> list[bytes]:
    """The `count` elements of a BYTES tensor; the lengths must add up to exactly `raw`."""
    view = memoryview(raw)
    out: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(out) == count:
            raise TensorError(f"input '{INPUT}': binary data holds more than the {count} element(s) of its shape")
        if offset + 4 > len(view):
            raise TensorError(f"input '{INPUT}': binary data ends inside the length of element {len(out)}")
        size = int.from_bytes(view[offset: offset + 4], "little")
        offset += 4
        if offset + size > len(view):
            raise TensorError(f"input '{INPUT}': element {len(out)} claims {size} bytes, {len(view) - offset} are left")
        out.append(bytes(view[offset: offset + size]))
        offset += size
    if len(out) != count:
        raise TensorError(f"input '{INPUT}': binary data holds {len(out)} element(s), its shape says {count}")
    return out


# --- requests -----------------------------------------------------------------------------------------------------
def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview | None]:
    if header_length is None:
        return body, None
    try:
        n = int(header_length)
    except ValueError:
        raise TensorError(f"Inference-Header-Content-Length must be an integer, got {header_length[:32]!r}") from None
    if not 0 < n <= len(body):
        raise TensorError(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def _batch(shape: list[int], max_images: int) -> int:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise TensorError(f"input '{INPUT}' must have shape [n] (or [n, 1]): one encoded image per element, got {shape}")
    n = shape[0]
    if n < 1:
        raise TensorError(f"input '{INPUT}' holds no image (shape {shape})")
    if n > max_images:
        raise TensorError(f"at most {max_images} image(s) per request, got {n}", "too_many_files")
    return n


def _flat(data: list[Any]) -> list[Any]:
    return [x for item in data for x in (item if isinstance(item, list) else [item])]


def _from_json(data: list[Any], count: int, parameters: dict[str, Any]) -> list[bytes]:
    content_type = parameters.get("content_type", "base64")
    if content_type != "base64":
        raise TensorError(f"input '{INPUT}': JSON elements are the images' base64 (content_type 'base64'), "
                          f"not {content_type!r}; send raw bytes with the binary tensor extension")
    items = _flat(data)
    if len(items) != count:
        raise TensorError(f"input '{INPUT}' has {len(items)} element(s), its shape says {count}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TensorError(f"input '{INPUT}' element {i}: expected a base64 string, got {type(item).__name__}")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise TensorError(f"input '{INPUT}' element {i} is not valid base64") from None
    return out


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TensorError(f"{what} must be true or false, got {value!r}")
    return value


def _outputs(req: InferRequest, heatmap: bool) -> list[tuple[str, bool]]:
    binary_all = _flag((req.parameters or {}).get("binary_data_output", False), "parameter 'binary_data_output'")
    if not req.outputs:
        names = [*DEFAULT_OUTPUTS, *(["anomaly_map"] if heatmap else [])]
        return [(name, binary_all) for name in names]
    out: list[tuple[str, bool]] = []
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise TensorError(f"unknown output {o.name!r}; this model has {', '.join(OUTPUTS)}")
        if any(o.name == name for name, _ in out):
            raise TensorError(f"output {o.name!r} is requested twice")
        binary = (o.parameters or {}).get("binary_data", binary_all)
        out.append((o.name, _flag(binary, f"output {o.name!r} parameter 'binary_data'")))
    return out


def _options(parameters: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    options: dict[str, Any] = {}
    for key in TEXT_PARAMETERS:
        if key in parameters:
            if not isinstance(parameters[key], str):
                raise TensorError(f"parameter {key!r} must be a string, got {parameters[key]!r}")
            options[key] = parameters[key]
    heatmap = _flag(parameters.get("heatmap", False), "parameter 'heatmap'")
    return options, heatmap


def parse_infer_request(body: bytes, header_length: str | None, max_images: int) -> ParsedRequest:
    """An inference request (JSON, or binary with `header_length` from `Inference-Header-Content-Length`) ->
    its images, the outputs it wants and its detect options. Raises TensorError."""
    head, rest = _split(body, header_length)
    try:
        req = InferRequest.model_validate_json(head)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise TensorError(f"invalid inference request{f' at {loc}' if loc else ''}: {first.get('msg', 'invalid')}") from None
    names = [i.name for i in req.inputs]
    if names != [INPUT]:
        raise TensorError(f"this model takes one input '{INPUT}' (BYTES, one encoded image per element), got {names}")
    tensor = req.inputs[0]
    if tensor.datatype != "BYTES":
        raise TensorError(f"input '{INPUT}' must be BYTES (encoded image files), got {tensor.datatype}")
    count = _batch(tensor.shape, max_images)
    parameters = tensor.parameters or {}
    size = parameters.get("binary_data_size")
    if size is not None:
        if rest is None:
            raise TensorError("binary_data_size without an Inference-Header-Content-Length header")
        if not isinstance(size, int) or isinstance(size, bool) or size != len(rest):
            raise TensorError(f"input '{INPUT}' binary_data_size {size!r} does not match the {len(rest)} bytes after "
                              "the JSON header")
        if tensor.data is not None:
            raise TensorError(f"input '{INPUT}' has both data and binary_data_size")
        images = deserialize_bytes(rest, count)
    else:
        if rest is not None and len(rest):
            raise TensorError(f"{len(rest)} bytes after the JSON header, but no input has binary_data_size")
        if tensor.data is None:
            raise TensorError(f"input '{INPUT}' has neither data nor binary_data_size")
        images = _from_json(tensor.data, count, parameters)
    options, heatmap = _options(req.parameters or {})
    outputs = _outputs(req, heatmap)
    options["heatmap"] = "json" if any(name == "anomaly_map" for name, _ in outputs) else "none"
    return ParsedRequest(req.id, images, outputs, options)


# --- answers ------------------------------------------------------------------------------------------------------
def result_tensors(results: Sequence[dict[str, Any]], names: Iterable[str]) -> list[Tensor]:
    """Detect results (the pipeline's answers, as /v1/detect returns them) -> the named output tensors."""
    n = len(results)
    out = []
    for name in names:
        datatype = OUTPUTS[name][0]
        if name == "label":
            out.append(Tensor(name, datatype, [n], [r["label"].encode() for r in results]))
            continue
        if name == "anomaly_map":
            grids = [np.asarray(r["heatmap"]["grid"], dtype=np.float32) for r in results]
            if len({g.shape for g in grids}) != 1:
                raise RuntimeError(f"anomaly maps of one batch differ in shape: {[g.shape for g in grids]}")
            out.append(Tensor(name, datatype, [n, *grids[0].shape], np.stack(grids)))
            continue
        key = {"result_id": "id"}.get(name, name)
        values = [r.get(key, False) if name == "calibrated" else r[key] for r in results]
        out.append(Tensor(name, datatype, [n], np.asarray(values, dtype=LITTLE_ENDIAN[datatype])))
    return out


def _raw(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        return serialize_bytes(t.values)
    return np.ascontiguousarray(t.values, dtype=LITTLE_ENDIAN[t.datatype]).tobytes()


def _json_data(t: Tensor) -> list[Any]:
    if t.datatype == "BYTES":
        return [b.decode("utf-8") for b in t.values]
    return np.asarray(t.values).reshape(-1).tolist()


def encode_response(model_name: str, model_version: str, request_id: str | None, tensors: Sequence[Tensor],
                    binary: dict[str, bool], parameters: dict[str, Any] | None = None) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON header's length when some output is binary (for
    `Inference-Header-Content-Length`; None: the body is all JSON)."""
    outputs = []
    raws = []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary.get(t.name):
            raw = _raw(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            entry["data"] = _json_data(t)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not raws:
        return head, None
    return head + b"".join(raws), len(head)


def model_metadata(name: str, version: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET /v2/models/{name}: the input (BYTES, base64 in JSON, raw in binary) and the outputs."""
    doc: dict[str, Any] = {
        "name": name, "versions": [version], "platform": "zsad",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1], "parameters": {"content_type": "base64"}}],
        "outputs": [{"name": k, "datatype": d, "shape": s} for k, (d, s) in OUTPUTS.items()],
    }
    if parameters:
        doc["parameters"] = parameters
    return doc
