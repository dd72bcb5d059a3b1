"""One settings object for the whole project, read from `ZSAD_*` environment variables.

The CLI, the service, the evaluation and the tests all take a `Settings`; nothing else reads the environment.
Every open detail of the method (shared/method-notes.md lists them) is a field here, with the default we chose in
`constants.py`. Secrets (the API keys) may also come from files in /run/secrets (Docker and Kubernetes secrets),
one file per variable, named like it in lower case (`zsad_api_keys_admin`), holding a JSON list.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .constants import (
    COMBINE_WEIGHT,
    DEFAULT_SCORE,
    FLEET_POLL_S,
    GENERIC_OBJECT,
    METRICS_MAX_PRODUCTS,
    MIN_REGION_AREA,
    OIP_MODEL_NAME,
    PROMPT_TEMPERATURE,
    REFERENCE_MAX_BYTES,
    REFERENCE_MAX_ROWS,
    REFERENCE_MAX_SHOTS,
    SLO_DETECT_P95_S,
    VIEW_COUNTS,
    ScoreName,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRETS_DIR = Path("/run/secrets")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZSAD_", env_file=None, extra="ignore",
                                      secrets_dir=SECRETS_DIR if SECRETS_DIR.is_dir() else None)

    # --- model store and model choice -------------------------------------------------------------------------
    model_store: Path = Field(REPO_ROOT / "model_store", description="Root of the versioned model store.")
    model_name: str = Field("default", description="FNN model name in the store that the service and CLI use.")
    model_version: str | None = Field(None, description="Pin a version; None follows the name's `current` pointer.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="'auto': fp16 on GPU, bf16 on CPUs with AMX, else fp32 (AVX512-BF16 alone is slower in bf16)."
    )
    hub_cache: Path | None = Field(None, description="Cache dir for pretrained CLIP downloads (default: <store>/_hub).")
    text_tower: Literal["release", "keep", "off"] = Field(
        "release", description="CLIP text tower (only needed for prompt anchors, which are cached in the model store "
        "under <model>/.anchors/): 'release' loads it when an object word's anchors are not cached and drops it "
        "again; 'keep' keeps it loaded; 'off' never loads it, and a word without cached anchors is refused."
    )

    # --- scoring ----------------------------------------------------------------------------------------------
    default_score: ScoreName = Field(DEFAULT_SCORE, description="Score used for the label when a request names none.")
    combine_weight: float = Field(COMBINE_WEIGHT, ge=0.0, le=1.0,
                                  description="Weight of s_fnn in `combined` (rest is s_pr).")
    prompt_temperature: float = Field(PROMPT_TEMPERATURE, gt=0.0,
                                      description="Softmax temperature of the prompt score s_pr.")
    generic_object: str = Field(GENERIC_OBJECT, description="Object word for s_pr when no object name is given.")
    tta_views: int | None = Field(
        None, description="Test-time augmentation: average the global embedding over this many flipped/rotated views "
        "of the input; None: the model manifest's recommendation, else 1 (off)."
    )

    # --- windows / heatmaps -------------------------------------------------------------------------------------
    window_scales: tuple[int, ...] | None = Field(
        None, description="Window sizes in patches (ViT) or feature cells (CNN); None: the model manifest's, else "
        "WinCLIP's (2, 3)."
    )
    window_stride: int = Field(1, ge=1, description="Window stride in patches / cells.")
    window_chunk: int = Field(1024, ge=1, description="Max windows per forward call: bounds memory.")
    cnn_window_mode: Literal["attnpool", "crop"] = Field(
        "attnpool", description="CNN towers: pool feature-map windows through the attention pool, or crop the image."
    )
    resize_policy: Literal["letterbox", "stretch", "center_crop"] = Field(
        "letterbox", description="Non-square images: letterbox keeps the whole image visible."
    )
    mask_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Pixel threshold where no product or line threshold sets one: heat above it "
        "forms the mask and the regions; None: the model manifest's `pixel_threshold_advice`, else 0.5."
    )
    min_region_area: float = Field(
        MIN_REGION_AREA, ge=0.0, lt=1.0, description="Smallest reported region, as a fraction of the image's pixels "
        "(smaller areas above the pixel threshold are dropped; an anomalous image's hottest spot is grown to this size)."
    )
    uncalibrated: Literal["label", "review"] = Field(
        "label", description="Images of a product without a calibrated (or admin-set) threshold: 'label' decides on the "
        "default threshold anyway; 'review' labels them 'review' instead of a verdict. `calibrated` says which it was."
    )

    # --- service --------------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="`zsad serve` bind address.")
    port: int = Field(8000, description="`zsad serve` port.")
    allow_open: bool = Field(
        False, description="`zsad serve` on a non-loopback address with no API keys: refused unless this is true."
    )
    api_keys_read: list[str] = Field(default_factory=list, description="Keys with the read scope.")
    api_keys_admin: list[str] = Field(default_factory=list, description="Keys with the admin scope (implies read).")
    max_upload_bytes: int = Field(20 * 1024 * 1024, description="Largest accepted request body.")
    max_pixels: int = Field(50_000_000, description="Largest accepted image (width x height).")
    max_heatmap_pixels: int = Field(
        4_000_000, ge=262_144, description="Service: larger images are decoded reduced by an integer factor to at most "
        "this many pixels (JPEG by the decoder's DCT scaling), and heatmaps and overlays are made at that size; "
        "sizes and regions are still reported in the original image's pixels."
    )
    max_pixels_in_flight: int = Field(
        100_000_000, ge=1_000_000, description="Service: decoded image pixels being worked on at once, across "
        "requests and batches; a request waits for room (503 `busy` at its deadline)."
    )
    body_timeout_s: float = Field(60.0, gt=0, description="A request body must arrive within this many seconds of "
                                  "the request's start; a stalled or trickling upload gets 408 and is disconnected.")
    max_concurrent_uploads: int = Field(32, ge=1, description="Request bodies read at once; more wait for a slot "
                                        "until their body deadline (then 503 with Retry-After, nothing read).")
    max_batch_size: int = Field(8, ge=1, description="Dynamic micro-batching: max images per forward.")
    max_batch_wait_ms: float = Field(5.0, ge=0.0, description="Dynamic micro-batching: max wait to fill a batch (only "
                                     "while other requests are arriving).")
    batching: bool = Field(True, description="Turn dynamic micro-batching off (batch size 1).")
    queue_size: int = Field(64, ge=1, description="Bounded inference queue; full -> 503 with Retry-After.")
    request_timeout_s: float = Field(60.0, gt=0, description="Per-request inference timeout.")
    results_url: str | None = Field(None, description="SQLAlchemy URL of the results store (PostgreSQL for replicas).")
    results_path: Path = Field(REPO_ROOT / "data" / "results.sqlite", description="SQLite results store path.")
    keep_heatmaps: bool = Field(True, description="Keep heatmap PNGs in the results store.")
    heatmap_retention: int = Field(1000, ge=0, description="Keep at most this many heatmap PNGs (oldest dropped).")
    thresholds_path: Path = Field(
        REPO_ROOT / "data" / "thresholds.json", description="The previous release's thresholds file: imported into "
        "the database once at start-up, then renamed to <name>.imported-<time>. Thresholds live in the database."
    )
    db_upgrade: bool | None = Field(
        None, description="Migrate the database schema (`zsad db upgrade`) at start-up. None: yes on SQLite; on "
        "PostgreSQL only check it and stay not ready when it is behind (the container entrypoint migrates)."
    )
    fleet_poll_s: float = Field(
        FLEET_POLL_S, ge=0.0, description="Seconds between reads of the fleet's desired model (then loaded when it "
        "changed) and heartbeats to the database; 0 turns both off: reloads stay on this replica."
    )
    replica_id: str | None = Field(
        None, min_length=1, max_length=128, description="This replica's id in GET /v1/fleet; None: <host>-<pid>."
    )
    default_threshold: float | None = Field(
        None, description="Threshold when no product threshold is set; None uses the model manifest's advice."
    )
    reference_max_shots: int = Field(
        REFERENCE_MAX_SHOTS, ge=1, description="Most calibration images embedded into a product's reference memory "
        "(evenly spread over the upload); the others only fit the threshold."
    )
    reference_max_rows: int = Field(
        REFERENCE_MAX_ROWS, ge=16, description="Rows per reference memory bank (cells, windows of each scale); above it "
        "a greedy coreset of this many rows is kept."
    )
    reference_max_bytes: int = Field(REFERENCE_MAX_BYTES, ge=1, description="Largest stored reference memory.")
    mmap_threshold: Literal["auto"] | Annotated[int, Field(ge=0, le=1 << 30)] = Field(
        "auto", description="Bytes from which glibc serves allocations with mmap, pinned at start-up "
        "(service/heap.py); 0 keeps glibc's adaptive default. auto: 4194304 when the served CLIP's weights file is "
        "64 MB or more (it lowers a large CLIP's peak memory), else 0 (the small embedded model runs faster without)."
    )
    reference_dense: bool = Field(
        False, description="CNN towers: also keep the good parts' mid-level feature map in the reference memory (the "
        "dense bank, PatchCore-style; needs 2+ shots): for one product in a fixed pose. false: WinCLIP+ exactly."
    )
    batch_max_images: int = Field(16, ge=1, description="Most images in one POST /v1/detect/batch request.")
    calibration_max_images: int = Field(1000, ge=1, description="Most images in one POST /v1/calibrate request.")
    calibration_max_bytes: int = Field(
        256 * 1024 * 1024, description="Largest request body for POST /v1/calibrate (many images in one upload)."
    )
    metrics_max_lines: int = Field(
        20, ge=0, description="Distinct `line` values used as metric labels; later lines are counted as 'other'."
    )
    metrics_lines: list[str] = Field(
        default_factory=list, description="Allow-list of `line` metric label values (JSON list); when set, exactly these "
        "are labels and every other line counts as 'other', the same on every replica (ZSAD_METRICS_MAX_LINES unused)."
    )
    metrics_max_products: int = Field(
        METRICS_MAX_PRODUCTS, ge=0, description="Distinct `product` values used as metric labels (first seen); later "
        "products are counted as 'other'."
    )
    metrics_products: list[str] = Field(
        default_factory=list, description="Allow-list of `product` metric label values (JSON list); when set, exactly "
        "these are labels and every other product counts as 'other' (ZSAD_METRICS_MAX_PRODUCTS unused)."
    )
    slo_detect_p95_s: float = Field(
        SLO_DETECT_P95_S, gt=0, description="Objective for the p95 latency of POST /v1/detect in seconds, exported as "
        "zsad_slo_detect_p95_seconds (the ZsadDetectLatencyHigh alert compares against it)."
    )
    oip_model_name: str = Field(
        OIP_MODEL_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Model name of the Open Inference Protocol (v2) endpoints: /v2/models/{name}/infer."
    )
    torch_threads: int = Field(
        0, ge=0, description="Service: torch intra-op CPU threads (0: torch's default, one per core). Set 1-2 when "
        "the CPU is shared with other processes: spinning thread pools slow down badly when oversubscribed."
    )

    @field_validator("metrics_lines", "metrics_products")
    @classmethod
    def _label_values(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not x or len(x) > 64]
        if bad:
            raise ValueError(f"metric label values must be 1-64 characters: {bad[:3]}")
        return list(dict.fromkeys(v))

    @field_validator("tta_views")
    @classmethod
    def _views_form_a_group(cls, v: int | None) -> int | None:
        if v is not None and v not in VIEW_COUNTS:
            raise ValueError(f"must be {', '.join(map(str, VIEW_COUNTS[:-1]))} or {VIEW_COUNTS[-1]} (flips and quarter turns "
                             "that form a group)")
        return v
