# syntax=docker/dockerfile:1.7
# zsad: the REST service in a container that needs no network at run time.
#
#   docker build -t zsad:cpu .                                      # CPU, embedded tiny default model
#   docker build -t zsad:cuda --build-arg VARIANT=cuda .            # CUDA runtime base
#   docker build -t zsad:vitb16p --build-arg VARIANT=cuda \
#       --build-arg CLIP_MODEL=ViT-B-16-plus-240 --build-arg CLIP_PRETRAINED=laion400m_e31 .
#
# With CLIP_MODEL/CLIP_PRETRAINED set, the CLIP weights are fetched (`zsad fetch-weights`) and the FNN for that CLIP
# is trained (`zsad train`) while the image builds; both end up in the image's model store (/models). Empty (the
# default): the embedded tiny default model from ./model_store is served. See docs/deployment.md.

ARG VARIANT=cpu
# Base images pinned by digest (multi-platform index digests; docs/deployment.md "Base images" says how they were
# obtained and how to check them): a rebuild gets the same bytes until the pin is moved
# on purpose. The tag is for humans; with a digest Docker ignores it. To move a pin, resolve the tag where a registry
# is reachable and paste the digest: `docker buildx imagetools inspect python:3.11-slim-bookworm` (the top "Digest:").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:ebef3c171eeef0298e4eb2e4be843105edf3b8b0ac45e0b43acee358e8046867

# --- bases: the same base is used to build the virtual environment and to run it ------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV ZSAD_PYTHON=/usr/local/bin/python3

FROM ${CUDA_IMAGE} AS base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV ZSAD_PYTHON=/usr/bin/python3 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# --- builder: torch for the variant, the serving dependencies, then the project (not editable) into /opt/venv --------
# Layers from the slowest-changing to the fastest: torch; the dependencies read from pyproject.toml (rebuilt only when
# it changes); the source (`pip install --no-deps .`, seconds). pip's cache is a BuildKit cache mount: wheels are
# reused across builds and never stored in a layer. Only the base dependencies are installed: no train/eval extras.
FROM base AS builder
ARG VARIANT
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Empty: the PyTorch CPU wheel index for VARIANT=cpu, the CUDA 12.8 index for VARIANT=cuda. Set it to use a mirror.
ARG TORCH_INDEX_URL=""
# Installed next to the project: the PostgreSQL driver for a shared results store (ZSAD_RESULTS_URL=postgresql+psycopg://...).
ARG EXTRA_PIP_PACKAGES="psycopg[binary]>=3.1,<4"
SHELL ["/bin/sh", "-eu", "-c"]
RUN "$ZSAD_PYTHON" -m venv /opt/venv
RUN --mount=type=cache,target=/root/.cache/pip \
    index="$TORCH_INDEX_URL"; \
    if [ -z "$index" ]; then \
      case "$VARIANT" in \
        cpu) index=https://download.pytorch.org/whl/cpu ;; \
        cuda) index=https://download.pytorch.org/whl/cu128 ;; \
        *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 2 ;; \
      esac; \
    fi; \
    pip install --index-url "$index" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
# Only what resolving the dependencies reads: a change to service/ or README.md leaves the layers below cached.
COPY pyproject.toml ./
COPY docker/requirements.py /usr/local/lib/zsad/requirements.py
# requirements.txt: serving (the [project] dependencies); requirements-train.txt: plus the `train` extra, for the
# models stage only. set -f: the package specs are split on spaces but never globbed ("psycopg[binary]" is a glob).
RUN --mount=type=cache,target=/root/.cache/pip \
    set -f; \
    python /usr/local/lib/zsad/requirements.py pyproject.toml > requirements.txt; \
    python /usr/local/lib/zsad/requirements.py pyproject.toml --extra train > requirements-train.txt; \
    pip install -r requirements.txt $EXTRA_PIP_PACKAGES
COPY README.md ./
COPY service ./service
# --no-deps: everything the project needs is installed above; pip check fails the build if that list fell short.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && pip check \
    && zsad --help >/dev/null

# --- models: the store the image serves; optionally a real CLIP fetched and its FNN trained at build time ------------
FROM builder AS models
ARG CLIP_MODEL=""
ARG CLIP_PRETRAINED=""
ARG MODEL_NAME=default
ARG N_PAIRS=10000
ARG TRAIN_SEED=0
# 1: the build fails unless the store serves MODEL_NAME. 0: allowed to be empty (a store is mounted at /models).
ARG VERIFY_MODEL=1
# The context's model_store/ (the embedded default model) when it has one; an empty store otherwise.
RUN --mount=type=bind,source=.,target=/context \
    mkdir -p /models \
    && if [ -d /context/model_store ]; then cp -a /context/model_store/. /models/; fi \
    && find /models -name '.tmp-*' -prune -exec rm -rf {} +
# Training needs the `train` extra (scikit-learn). It goes into this stage's copy of the venv only: the runtime
# copies /opt/venv from the builder stage, which never has it.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$CLIP_MODEL" ] || [ -n "$CLIP_PRETRAINED" ]; then \
      if [ -z "$CLIP_MODEL" ] || [ -z "$CLIP_PRETRAINED" ]; then \
        echo "set both CLIP_MODEL and CLIP_PRETRAINED (or neither, for the embedded tiny model)" >&2; exit 2; \
      fi; \
      pip install -r /src/requirements-train.txt; \
      zsad --store /models fetch-weights --model "$CLIP_MODEL" --pretrained "$CLIP_PRETRAINED" --timeout 120; \
      zsad --store /models train --model "$CLIP_MODEL" --pretrained "$CLIP_PRETRAINED" --name "$MODEL_NAME" \
          --n-pairs "$N_PAIRS" --seed "$TRAIN_SEED" --device cpu --quiet; \
    fi; \
    if [ "$VERIFY_MODEL" = 1 ]; then \
      HF_HUB_OFFLINE=1 ZSAD_MODEL_STORE=/models ZSAD_MODEL_NAME="$MODEL_NAME" ZSAD_DEVICE=cpu python -c \
        "from service.detector import load_detector; from service.settings import Settings; \
d = load_detector(Settings()); print('image model store serves', d.name + '@' + d.version)"; \
    fi

# --- runtime ---------------------------------------------------------------------------------------------------------
FROM base AS runtime
ARG MODEL_NAME=default
ARG VARIANT
LABEL org.opencontainers.image.title="zsad" \
      org.opencontainers.image.description="Zero-shot visual anomaly detection REST service" \
      org.opencontainers.image.source="docs/deployment.md"
RUN groupadd --system --gid 10001 zsad \
    && useradd --system --uid 10001 --gid zsad --home-dir /home/zsad --create-home --shell /usr/sbin/nologin zsad \
    && mkdir -p /data \
    && chown zsad:zsad /data
COPY --from=builder /opt/venv /opt/venv
COPY --from=models /models /models
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/zsad-entrypoint
COPY --chmod=0644 docker/healthcheck.py /usr/local/lib/zsad/healthcheck.py
# The model store is read-only for the service; results and thresholds go to /data (a volume).
ENV ZSAD_VARIANT=${VARIANT} \
    ZSAD_MODEL_STORE=/models \
    ZSAD_MODEL_NAME=${MODEL_NAME} \
    ZSAD_HOST=0.0.0.0 \
    ZSAD_PORT=8000 \
    ZSAD_RESULTS_PATH=/data/results.sqlite \
    ZSAD_THRESHOLDS_PATH=/data/thresholds.json \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/zsad
WORKDIR /home/zsad
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/opt/venv/bin/python", "/usr/local/lib/zsad/healthcheck.py"]
ENTRYPOINT ["zsad-entrypoint"]
CMD ["serve"]
