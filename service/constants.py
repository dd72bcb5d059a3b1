"""Names and defaults defined once, as open_clip keeps its constants in one module.

Everything that more than one module needs to agree on lives here: the score registry (what the detector computes,
what the API returns, what thresholds apply to, what the CLI and the evaluation print), the method's defaults, and
the image conventions. No heavy imports: settings, schemas and the CLI read this module at import time.

Adding a score variant: a `ScoreSpec` here, its computation in `scoring.all_scores`, and its test. Everything else
(settings, request/response schemas, thresholds, CLI output, evaluation variants) follows the registry, and a
detector whose scores do not match it is refused when the service loads it (`check_score_names`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ScoreSpec:
    name: str  # the key in Detection.scores, API bodies and threshold entries
    alias: str  # the paper's name, printed by the CLI and the evaluation
    description: str
    uses_fnn: bool  # changes with the FNN version (the evaluation compares versions on these)


SCORES: tuple[ScoreSpec, ...] = (
    ScoreSpec("fnn", "s_fnn", "s_fnn: FNN probability that the image is anomalous (the paper's score).", True),
    ScoreSpec("prompt", "s_pr", "s_pr: two-class prompt-ensemble score for the object word (WinCLIP's zero-shot "
              "score).", False),
    ScoreSpec("combined", "combined", "'CLIP + FNN': weighted mean of s_fnn and s_pr (`ZSAD_COMBINE_WEIGHT`).", True),
)
SCORE_NAMES: tuple[str, ...] = tuple(s.name for s in SCORES)
SCORE_ALIASES: dict[str, str] = {s.name: s.alias for s in SCORES}
ScoreName = Literal[SCORE_NAMES]  # type: ignore[valid-type]  # runtime Literal built from the registry
DEFAULT_SCORE = "combined"


def check_score_names(names: object) -> None:
    """Raise ValueError unless `names` (e.g. a Detection's score keys) are exactly the registry's names."""
    got = tuple(names)  # type: ignore[call-overload]
    if set(got) != set(SCORE_NAMES):
        raise ValueError(f"the detector computes scores {sorted(got)}, the score registry names {sorted(SCORE_NAMES)}: "
                         "add the new score to service/constants.py SCORES (or compute every registered one)")


# --- the method's defaults (docs: shared/method-notes.md) -------------------------------------------------------------
PROMPT_TEMPERATURE = 0.07  # WinCLIP's softmax temperature for s_pr
COMBINE_WEIGHT = 0.5  # weight of s_fnn in `combined`; the rest is s_pr
CALIBRATION_QUANTILE = 0.99  # a calibrated score of 0.5 = above this share of normal reference images
WINDOW_SCALES: tuple[int, ...] = (2, 3)  # WinCLIP's window sizes, in patches, when the model recommends none
VIEW_COUNTS: tuple[int, ...] = (1, 2, 4, 8)  # test-time views: prefixes of the dihedral group that are groups
GENERIC_OBJECT = "object"  # object word for s_pr when none is given

# --- labels, thresholds, localisation -----------------------------------------------------------------------------
LABELS: tuple[str, ...] = ("anomalous", "normal", "review")  # review: an uncalibrated product under ZSAD_UNCALIBRATED=review
UNCALIBRATED_POLICIES: tuple[str, ...] = ("label", "review")  # what an uncalibrated product's images get as label
FALLBACK_THRESHOLD = 0.5  # image threshold when neither a product, the settings nor the model give one
FALLBACK_PIXEL_THRESHOLD = 0.5  # pixel (heat) threshold likewise
# Regions: connected areas of heat above the pixel threshold of at least this fraction of the image (a 64 x 64 image:
# 41 pixels). The pixel threshold of a calibration: this quantile of the heat of all pixels of the normal images. Both
# chosen on the validation kinds by benchmarks/localisation.py (best region F1 of 8 rules x 5 areas).
MIN_REGION_AREA = 0.01
PIXEL_QUANTILE = 0.98
MAX_REGIONS = 32  # hottest regions reported per image (the mask is their union)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"  # product and line names (API and CLI)

# --- few-shot reference memories (service/fewshot.py) ----------------------------------------------------------------
MODES: tuple[str, ...] = ("zero_shot", "few_shot")  # how an image was scored: text prompts only, or + a memory
REFERENCE_MAX_SHOTS = 64  # calibration images that go into a product's memory (the rest only fit the threshold)
REFERENCE_MAX_ROWS = 4096  # rows per memory bank; above it a greedy coreset is kept
REFERENCE_MAX_BYTES = 256 * 1024 * 1024  # largest stored memory

# --- operations: metrics, service-level objectives, the Open Inference Protocol ---------------------------------------
SLO_DETECT_P95_S = 1.0  # objective for the p95 latency of POST /v1/detect (exported; the alert rule compares to it)
METRICS_MAX_PRODUCTS = 20  # distinct `product` metric label values (first seen) before `other`
OIP_MODEL_NAME = "zsad"  # the model name under /v2/models/ (KServe / Triton clients)

# --- images -----------------------------------------------------------------------------------------------------------
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")  # the only decoders ever run
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# --- the shared database (service/db/) --------------------------------------------------------------------------------
GROUP_COMMIT_WAIT_S = 0.025  # the longest a result commit waits for the rest of its micro-batch (results.CommitSlot)
FLEET_POLL_S = 2.0  # how often a replica reads the fleet's desired model and writes its heartbeat
FLEET_STALE_POLLS = 3  # a replica not seen for this many poll intervals (at least 10 s) is listed as stale
FLEET_FORGET_S = 3600.0  # heartbeat rows not updated for this long are deleted
DB_MIGRATION_LOCK = 0x7A736164  # PostgreSQL advisory lock key held while migrating ("zsad")
