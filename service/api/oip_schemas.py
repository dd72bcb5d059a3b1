"""Bodies of the Open Inference Protocol (v2, KServe / Triton) REST endpoints: parsing the inference request's JSON
header, and the shapes and examples of the OpenAPI document. Kept apart from `schemas.py` (zsad's own API)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Parameter = bool | int | float | str  # OIP parameter values: bool, number or string


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(extra="ignore", json_schema_extra={"examples": list(examples)})


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a variable dimension (the batch).")
    parameters: dict[str, Parameter] | None = None


class ServerMetadata(BaseModel):
    model_config = _examples({"name": "zsad", "version": "0.1.0", "extensions": ["binary_tensor_data"]})
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    model_config = _examples({
        "name": "zsad", "versions": ["v3"], "platform": "zsad",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1],
                    "parameters": {"content_type": "base64"}}],
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "threshold", "datatype": "FP32", "shape": [-1]},
                    {"name": "calibrated", "datatype": "BOOL", "shape": [-1]},
                    {"name": "result_id", "datatype": "INT64", "shape": [-1]},
                    {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, -1, -1]}],
        "parameters": {"model": "default", "clip": "store:tiny-factory-clip@v3"},
    })
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Parameter] | None = None


class ModelReady(BaseModel):
    model_config = _examples({"name": "zsad", "ready": True})
    name: str
    ready: bool


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Parameter] | None = None
    data: list[Any] | None = Field(None, description="JSON form: the tensor's elements (here base64 strings), "
                                                     "row-major, nested or flat.")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Parameter] | None = None


class InferRequest(BaseModel):
    """The JSON of an inference request (in the binary form: its first `Inference-Header-Content-Length` bytes)."""

    model_config = _examples({
        "id": "cam1-000123",
        "parameters": {"product": "widget", "line": "line-3"},
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["iVBORw0KGgoAAAANSUhEUgAA..."]}],
        "outputs": [{"name": "score"}, {"name": "label"}, {"name": "threshold"}],
    })
    id: str | None = None
    parameters: dict[str, Parameter] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Parameter] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_config = _examples({
        "model_name": "zsad", "model_version": "v3", "id": "cam1-000123",
        "parameters": {"score_name": "combined", "threshold_source": "product"},
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [1], "data": [0.734]},
                    {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["anomalous"]},
                    {"name": "threshold", "datatype": "FP32", "shape": [1], "data": [0.61]}],
    })
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Parameter] | None = None
    outputs: list[ResponseOutput]
