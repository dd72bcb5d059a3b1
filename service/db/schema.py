"""The tables, in SQLAlchemy Core. `service/migrations/` creates and changes them; a test checks that a database
upgraded to the head revision has exactly these tables, columns and indexes.

- `results`, `heatmaps`: every detection (see `service/api/results.py`); `results.calibrated` added in 0003,
  `results.mode` and `results.shots` (zero-shot or few-shot, and with how many reference images) in 0005.
- `thresholds`: one row per product (`line` = '') and per product line, with the score it applies to, where it
  came from, a `version` that every write increments (optimistic concurrency: a write may name the version it
  read and is refused when another write came first), and `extra`, a JSON object for fields that ride along with a
  threshold (the last calibration's summary, a pixel threshold, ...) so adding one needs no migration.
- `calibrations`: every stored calibration (who, when, how many images, the fitted threshold, the model, the
  distribution summary), kept as history: a threshold row holds only the latest.
- `fleet_desired`: one row (id 1), the model the whole fleet should serve, with a generation that grows on every
  change so a replica can tell a new request from one it has already tried, and the candidate of a rollout in
  progress (the version the receiving replica is verifying; the others load it ahead, and swap once it is desired).
- `replicas`: one heartbeat row per replica (what it serves, whether it is ready, its last rollout error).

- `reference_memories` (0004): one few-shot reference memory per product (`line` = '') and per product line that has
  its own (`service/db/memories.py`): the serialised memory, its JSON header (shots, rows, the model that embedded it),
  its size, and a `stamp` that changes on every write (the replicas' caches key on it).
"""
from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

NAME_LEN = 64  # product, line, model names and versions (the API's NAME_PATTERN allows 1-64 characters)

results_table = Table(
    "results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Float, nullable=False),
    Column("line", String(64)),
    Column("product", String(64)),
    Column("model_name", String(64), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("score_name", String(16), nullable=False),
    Column("score", Float, nullable=False),
    Column("label", String(16), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("threshold_source", String(16), nullable=False),
    Column("scores", JSON, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("object_name", String(64)),
    Column("filename", String(255)),
    Column("width", Integer),
    Column("height", Integer),
    # True when the threshold was set for the product or line (calibration or admin); NULL in rows stored before
    # the column existed (revision 0003).
    Column("calibrated", Boolean),
    # How the image was scored: 'zero_shot' or 'few_shot' against `shots` reference images; NULL in rows stored
    # before the columns existed (revision 0005).
    Column("mode", String(16)),
    Column("shots", Integer),
    Index("ix_results_created_at", "created_at"),
    Index("ix_results_product_id", "product", "id"),
    Index("ix_results_line_id", "line", "id"),
    sqlite_autoincrement=True,
)

heatmaps_table = Table(
    "heatmaps",
    metadata,
    Column("result_id", Integer, ForeignKey("results.id", ondelete="CASCADE"), primary_key=True),
    Column("png", LargeBinary, nullable=False),
)

thresholds_table = Table(
    "thresholds",
    metadata,
    Column("product", String(NAME_LEN), primary_key=True),
    Column("line", String(NAME_LEN), primary_key=True),  # '' = the product's own threshold
    Column("threshold", Float, nullable=False),
    Column("score", String(16), nullable=False),
    Column("source", String(32), nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(NAME_LEN)),
    Column("version", Integer, nullable=False),
    Column("extra", JSON, nullable=False),
)

calibrations_table = Table(
    "calibrations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("product", String(NAME_LEN), nullable=False),
    Column("line", String(NAME_LEN), nullable=False),  # '' = the product
    Column("score", String(16), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("target_frr", Float, nullable=False),
    Column("n_images", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(NAME_LEN)),
    Column("model_name", String(NAME_LEN)),
    Column("model_version", String(NAME_LEN)),
    Column("stored", Boolean, nullable=False),
    Column("details", JSON, nullable=False),
    Index("ix_calibrations_product_id", "product", "id"),
    sqlite_autoincrement=True,
)

fleet_desired_table = Table(
    "fleet_desired",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("model_name", String(NAME_LEN)),  # NULL until a first rollout succeeded
    Column("model_version", String(NAME_LEN)),
    Column("generation", Integer, nullable=False),
    Column("set_at", Float),
    Column("set_by", String(128)),
    Column("candidate_name", String(NAME_LEN)),  # a rollout in progress: loaded ahead by the others, not yet served
    Column("candidate_version", String(NAME_LEN)),
    Column("candidate_at", Float),
)

replicas_table = Table(
    "replicas",
    metadata,
    Column("replica_id", String(128), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("status", String(16), nullable=False),  # loading | ready | failed | stopping | stopped
    Column("model_name", String(NAME_LEN)),
    Column("model_version", String(NAME_LEN)),
    Column("applied_generation", Integer),
    Column("error", Text),
    Column("package_version", String(32)),
)

reference_memories_table = Table(
    "reference_memories",
    metadata,
    Column("product", String(NAME_LEN), primary_key=True),
    Column("line", String(NAME_LEN), primary_key=True),  # '' = the product's own memory
    Column("data", LargeBinary, nullable=False),  # fewshot.ReferenceMemory.to_bytes()
    Column("header", JSON, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("stamp", String(32), nullable=False),
    Column("updated_at", Float, nullable=False),
)
