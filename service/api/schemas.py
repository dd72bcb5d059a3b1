"""Pydantic models of request and response bodies, with the examples shown in the OpenAPI document."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..constants import NAME_PATTERN, SCORES, ScoreName

Label = Literal["anomalous", "normal", "review"]  # review: uncalibrated product under ZSAD_UNCALIBRATED=review
Mode = Literal["zero_shot", "few_shot"]  # constants.MODES
ThresholdSource = Literal["line", "product", "settings", "manifest", "fallback"]


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class Health(BaseModel):
    model_config = _examples({"status": "ok"})
    status: str = "ok"


class Readiness(BaseModel):
    """200 answer of /readyz. A 503 answer has the same fields plus the common `error` object (code `not_ready`,
    the reason in its message: the model name and what is wrong, never a file path)."""

    model_config = _examples(
        {"ready": True, "status": "ready", "model": {"name": "default", "version": "v2", "clip": "store:tiny-factory-clip@v3"}},
        {"ready": False, "status": "failed", "model": None,
         "error": {"code": "not_ready", "message": "not ready: failed (cannot load model 'default': model 'default' has "
                                                   "no current version in the store (models: none))"}},
    )
    ready: bool
    status: Literal["loading", "ready", "failed", "stopping"]
    model: ModelRef | None = None
    error: ErrorDetail | None = Field(None, description="Only in 503 answers: why the service is not ready.")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ModelRef(BaseModel):
    name: str
    version: str
    clip: str | None = Field(None, description="The CLIP the FNN runs on (not kept in stored results).")


# Every score of the registry (constants.SCORES), and nothing else.
Scores = create_model("Scores", __config__=ConfigDict(extra="forbid"),
                      **{s.name: (float, Field(description=s.description)) for s in SCORES})


class DetectParams(BaseModel):
    """Options of /v1/detect, as query parameters or (multipart) form fields; form fields win."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    line: str | None = Field(None, pattern=NAME_PATTERN, description="Production line (for thresholds and stats).")
    product: str | None = Field(None, pattern=NAME_PATTERN, description="Product: selects the threshold.")
    heatmap: Literal["none", "png", "json"] = Field(
        "none", description="none: scores only (fastest); png: base64 PNG overlay; json: patch-level grid.")
    object: str | None = Field(None, max_length=64, description="Object word for the prompt score s_pr.")
    score: ScoreName | None = Field(
        None, description="Score the label is decided on (default: the product threshold's score, else settings).")


class StageTimings(BaseModel):
    """Milliseconds per stage. Model stages (preprocess, embed, windows, aggregate) are those of the micro-batch the
    image ran in; `null` where a stage did not run (e.g. windows without a heatmap)."""

    decode: float | None = None
    queue: float | None = None
    preprocess: float | None = None
    embed: float | None = None
    windows: float | None = None
    aggregate: float | None = None
    encode: float | None = None
    persist: float | None = None
    total: float | None = None


class ImageInfo(BaseModel):
    width: int
    height: int
    format: str


class Heatmap(BaseModel):
    format: Literal["png", "json"]
    score: ScoreName
    png_base64: str | None = Field(None, description="PNG overlay of the heatmap on the image (format=png).")
    grid: list[list[float]] | None = Field(None, description="Patch-level map, rows x cols, values in [0, 1] (json).")
    rows: int | None = None
    cols: int | None = None
    mask_png_base64: str | None = Field(None, description="PNG mask (0 / 255, the image's size): exactly the union of "
                                        "`regions` (format=png).")
    pixel_threshold: float | None = Field(None, description="Heat above this forms the regions and the mask.")
    pixel_threshold_source: ThresholdSource | None = Field(None, description="Where the pixel threshold came from.")


class ResultRecord(BaseModel):
    """One scored image as the results store keeps it (GET /v1/results); a detect answer adds the request's extras."""

    model_config = _examples({
        "id": 1042, "created_at": "2025-11-26T17:03:12.481Z", "line": "line-3", "product": "widget",
        "model": {"name": "default", "version": "v3", "clip": None}, "score_name": "combined", "score": 0.734,
        "label": "anomalous", "threshold": 0.61, "threshold_source": "product", "calibrated": True,
        "scores": {"fnn": 0.812, "prompt": 0.656, "combined": 0.734}, "latency_ms": 44.9, "object": "screw",
        "filename": "cam1_000123.png", "width": 640, "height": 480, "heatmap_url": "/v1/results/1042/heatmap.png",
        "mode": "few_shot", "shots": 16,
    })
    id: int = Field(description="Result id in the results store (GET /v1/results/{id}).")
    created_at: str
    line: str | None
    product: str | None
    model: ModelRef
    score_name: ScoreName
    score: float = Field(description="The score the label is decided on (`score_name`).")
    label: Label
    threshold: float
    threshold_source: ThresholdSource
    calibrated: bool | None = Field(
        None, description="True when the threshold was set for this product or line (a calibration or an admin); false "
        "when a default applied (settings, the model's advice, 0.5), whose false-reject rate on this product is unknown. "
        "Null for results stored before the field existed.")
    scores: Scores
    latency_ms: float = Field(description="Time from the request's arrival to its result being ready to store.")
    object: str | None = None
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    heatmap_url: str | None = Field(None, description="Stored heatmap PNG, while within the retention limit.")
    mode: Mode | None = Field(None, description="few_shot: scored against the product's reference memory (WinCLIP+); "
                              "zero_shot: text prompts only (no memory, or a stale one). Null for results stored "
                              "before the field existed.")
    shots: int | None = Field(None, description="Reference images in the memory used (0 in zero-shot mode).")


class DetectResult(ResultRecord):
    model_config = _examples({
        "id": 1042, "created_at": "2025-11-26T17:03:12.481Z", "line": "line-3", "product": "widget",
        "filename": "cam1_000123.png", "score": 0.734, "score_name": "combined", "label": "anomalous",
        "threshold": 0.61, "threshold_source": "product", "calibrated": True,
        "scores": {"fnn": 0.812, "prompt": 0.656, "combined": 0.734},
        "model": {"name": "default", "version": "v3", "clip": "store:tiny-factory-clip@v3"},
        "latency_ms": 42.7, "object": None, "width": 640, "height": 480,
        "timings_ms": {"decode": 3.1, "queue": 0.4, "preprocess": 1.2, "embed": 18.5, "windows": 9.8,
                       "aggregate": 1.7, "encode": 6.3, "persist": 2.2, "total": 44.9},
        "batch_size": 2, "image": {"width": 640, "height": 480, "format": "PNG"},
        "heatmap": {"format": "png", "score": "combined", "png_base64": "iVBORw0KGgoAAAANSUhEUgAA...",
                    "mask_png_base64": "iVBORw0KGgoAAAANSUhEUgAA...", "pixel_threshold": 0.42,
                    "pixel_threshold_source": "product", "grid": None, "rows": None, "cols": None},
        "regions": [{"x0": 312, "y0": 140, "x1": 370, "y1": 181, "area_px": 1730, "max_score": 0.91,
                     "mean_score": 0.72, "bbox": [312, 140, 370, 181]}],
        "heatmap_url": "/v1/results/1042/heatmap.png",
    })
    timings_ms: StageTimings
    batch_size: int = Field(description="Images in the micro-batch this image was scored in.")
    image: ImageInfo
    heatmap: Heatmap | None = None
    regions: list[dict[str, Any]] | None = Field(
        None, description="Connected regions of heat above the pixel threshold, hottest first, each at least "
        "ZSAD_MIN_REGION_AREA of the image; they agree with the verdict (score > threshold): at least one, holding the "
        "heat's maximum, when it is anomalous, none when it is normal. Image pixels, bbox end-exclusive.")
    mode: Mode = Field("zero_shot", description="few_shot: scored against the product's reference memory (WinCLIP+); "
                       "zero_shot: text prompts only (no memory, or a stale one: see `reference`).")
    shots: int = Field(0, description="Reference images in the memory used (0 in zero-shot mode).")
    reference: dict[str, Any] | None = Field(
        None, description="The product's (line's) reference memory: shots, rows, model, and `stale`/`note` when it was "
        "made by another model than the one serving (then the image was scored zero-shot). Null: none.")


class BatchResult(BaseModel):
    model_config = _examples({"count": 2, "anomalous": 1, "review": 0, "results": ["<DetectResult>", "<DetectResult>"]})
    count: int
    anomalous: int
    review: int = Field(0, description="Images labelled `review` (uncalibrated product, ZSAD_UNCALIBRATED=review).")
    results: list[DetectResult]


class ResultsPage(BaseModel):
    model_config = _examples({"items": ["<ResultRecord>"], "next_cursor": "1017", "limit": 25})
    items: list[ResultRecord]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last page.")
    limit: int


class Stats(BaseModel):
    model_config = _examples({
        "line": "line-3", "product": "widget", "window": "24h", "since": "2025-11-25T17:03:12.000Z", "count": 1200,
        "anomalous": 18, "anomaly_rate": 0.015, "review": 0, "uncalibrated": 40,
        "uncalibrated_products": [{"product": "gasket", "count": 40}], "sampled": 1200,
        "score": {"min": 0.08, "mean": 0.31, "max": 0.93, "p50": 0.29, "p90": 0.47, "p95": 0.55, "p99": 0.74},
        "latency_ms": {"mean": 41.0, "p50": 38.2, "p95": 61.0, "p99": 95.4},
    })
    line: str | None
    product: str | None
    window: str | None
    since: str | None
    count: int
    anomalous: int
    anomaly_rate: float | None
    review: int = Field(0, description="Results labelled `review`.")
    uncalibrated: int = Field(0, description="Results scored against a default threshold (calibrated false).")
    uncalibrated_products: list[dict[str, Any]] = Field(
        default_factory=list, description="Products with uncalibrated results in the window, most first (at most 50).")
    sampled: int = Field(description="Rows the percentiles were computed on (newest first, at most 100000).")
    score: dict[str, float] | None
    latency_ms: dict[str, float] | None


class ThresholdIn(BaseModel):
    model_config = _examples({"threshold": 0.61, "score": "combined"}, {"threshold": 0.61, "pixel_threshold": 0.42})
    threshold: float = Field(ge=0.0, le=1.0, description="An image is anomalous when its score is above this.")
    score: ScoreName | None = Field(None, description="The score this threshold applies to (default: settings).")
    pixel_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Heat above this forms the regions and the mask (the same score's map); "
        "omitted: keep the stored one (for the same score), else the default.")


class ThresholdEntry(BaseModel):
    model_config = _examples({
        "product": "widget",
        "entry": {"threshold": 0.61, "score": "combined", "source": "manual", "updated_at": "2025-11-26T17:00:00+00:00",
                  "lines": {"line-3": {"threshold": 0.7, "score": "combined", "source": "calibration",
                                       "updated_at": "2025-11-26T16:00:00+00:00"}}},
    })
    product: str
    entry: dict[str, Any]


class ThresholdConfig(BaseModel):
    model_config = _examples({
        "products": {"widget": {"threshold": 0.61, "score": "combined", "source": "manual", "lines": {}}},
        "default": {"threshold": 0.5, "source": "fallback", "score": "combined"},
    })
    products: dict[str, Any]
    default: dict[str, Any]


class CalibrationResult(BaseModel):
    model_config = _examples({
        "product": "widget", "line": None, "score_name": "combined", "threshold": 0.583, "target_frr": 0.01,
        "pixel_threshold": 0.412, "stored": True,
        "model": {"name": "default", "version": "v2", "clip": "store:tiny-factory-clip@v3"},
        "distribution": {"n": 200, "target_frr": 0.01, "achieved_frr": 0.01, "expected_frr": 0.01,
                         "min": 0.11, "max": 0.61, "mean": 0.29, "std": 0.08,
                         "percentiles": {"p1": 0.13, "p5": 0.17, "p25": 0.24, "p50": 0.28, "p75": 0.34, "p95": 0.45,
                                         "p99": 0.58},
                         "histogram": {"edges": [0.0, 0.05, "...", 1.0], "counts": [0, 0, 3, "..."]},
                         "scores": [0.28, 0.31, "..."]},
    })
    product: str
    line: str | None
    score_name: ScoreName
    threshold: float
    target_frr: float
    pixel_threshold: float | None = Field(
        None, description="The 0.98 quantile of the normal images' heat (at most 2% of their pixels lie above it): heat "
        "above it forms the regions and the mask.")
    stored: bool
    model: ModelRef
    distribution: dict[str, Any]
    pixel_distribution: dict[str, Any] | None = Field(
        None, description="How the pixel threshold was fitted: images, pixels, quantile, the share of pixels and of "
        "images above it, percentiles of the images' heat maxima.")
    mode: Mode = Field("zero_shot", description="few_shot: the images also became the reference memory, and the "
                       "threshold was fitted on few-shot scores (leave-one-out for the shots).")
    shots: int = Field(0, description="Images in the reference memory (0 with reference=false).")
    reference: dict[str, Any] | None = Field(None, description="The memory built: shots, rows per bank, coreset "
                                             "subsampling (if any), size in bytes, model.")


class CalibrationRecord(BaseModel):
    model_config = _examples({
        "id": 12, "product": "widget", "line": None, "score": "combined", "threshold": 0.583, "target_frr": 0.01,
        "n_images": 200, "created_at": "2025-11-26T17:00:00+00:00", "created_by": "key:3f9a0c1b2d4e",
        "model": {"name": "default", "version": "v3"}, "stored": True,
        "details": {"n": 200, "achieved_frr": 0.01, "percentiles": {"p50": 0.28, "p99": 0.58}, "...": "..."},
    })
    id: int
    product: str
    line: str | None
    score: str
    threshold: float
    target_frr: float
    n_images: int
    created_at: str
    created_by: str | None = Field(description="A fingerprint of the admin key that calibrated (never the key).")
    model: dict[str, Any]
    stored: bool
    details: dict[str, Any] = Field(description="The distribution summary: n, achieved rate, percentiles, ...")


class ModelsInfo(BaseModel):
    model_config = _examples({
        "ready": True, "status": "ready",
        "model": {"name": "default", "version": "v2", "clip": "store:tiny-factory-clip@v3", "device": "cuda:0",
                  "dtype": "torch.float16", "tta_views": 4, "window_scales": [1, 2, 3],
                  "manifest": {"kind": "fnn", "version": "v3", "...": "..."}},
        "available": [{"name": "default", "versions": ["v1", "v2", "v3"], "current": "v3"}],
        "error": None,
    })
    ready: bool
    status: str
    model: dict[str, Any] | None
    available: list[dict[str, Any]]
    error: str | None = None


class ReloadIn(BaseModel):
    model_config = _examples({"name": "default", "version": "v4"}, {})
    name: str | None = Field(None, pattern=NAME_PATTERN, description="Store model name (default: settings).")
    version: str | None = Field(None, pattern=NAME_PATTERN, description="Version (default: the `current` pointer).")


class ReloadOut(BaseModel):
    model_config = _examples({
        "previous": {"name": "default", "version": "v1", "clip": "store:tiny-factory-clip@v1"},
        "current": {"name": "default", "version": "v2", "clip": "store:tiny-factory-clip@v3"}, "load_seconds": 2.41,
    })
    previous: ModelRef | None
    current: ModelRef
    load_seconds: float
    desired: dict[str, Any] | None = Field(
        None, description="The fleet's desired model this reload set (name, version, generation, set_at, set_by): the "
        "other replicas load it within ZSAD_FLEET_POLL_S. None when the fleet is off (ZSAD_FLEET_POLL_S=0).")


class FleetReplica(BaseModel):
    id: str = Field(description="ZSAD_REPLICA_ID, default <host>-<pid>.")
    host: str
    pid: int
    status: str = Field(description="loading | ready | failed | stopping | stopped, as last reported.")
    ready: bool = Field(description="Reported ready and seen within the staleness window.")
    stale: bool = Field(description="Not seen for max(10 s, 3 poll intervals): gone, hung or cut off the database.")
    model: dict[str, Any] | None = Field(description="The model it serves (name, version).")
    in_sync: bool = Field(description="It serves the desired model (true when none is set).")
    applied_generation: int | None
    error: str | None = Field(description="Its last rollout or load failure (cleared by the next success).")
    started_at: str
    last_seen: str
    last_seen_s: float = Field(description="Seconds since its last heartbeat.")
    package_version: str | None


class FleetInfo(BaseModel):
    model_config = _examples({
        "desired": {"name": "default", "version": "v4", "generation": 7, "set_at": "2025-11-26T17:03:12.481Z",
                    "set_by": "key:3f9a0c1b2d4e"},
        "converged": True, "this_replica": "zsad-7d9f-abcde", "poll_s": 2.0,
        "replicas": [{"id": "zsad-7d9f-abcde", "host": "zsad-7d9f-abcde", "pid": 1, "status": "ready", "ready": True,
                      "stale": False, "model": {"name": "default", "version": "v4"}, "in_sync": True,
                      "applied_generation": 7, "error": None, "started_at": "2025-11-26T16:00:00.000Z",
                      "last_seen": "2025-11-26T17:03:13.002Z", "last_seen_s": 0.8, "package_version": "0.1.0"}],
    })
    desired: dict[str, Any] | None = Field(description="The model the fleet should serve; None until a reload set it.")
    converged: bool = Field(description="Every live (not stale) replica is ready and serves the desired model.")
    this_replica: str
    poll_s: float
    replicas: list[FleetReplica]


Readiness.model_rebuild()
