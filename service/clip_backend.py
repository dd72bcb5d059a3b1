"""CLIP backend: build an open_clip model from a pretrained tag, a local weights file or an in-house store entry.

The model is always created *without* weights and then loaded from a resolved file with safe loaders
(safetensors, or `torch.load(weights_only=True)` inside open_clip). If the file is missing, loading fails with a
message naming `zsad fetch-weights`: a randomly initialised CLIP is never returned.

Embeddings leave this module L2-normalised (and, when the model ships modality centres, centred and renormalised),
as float32 on the CPU-or-GPU device they were computed on. Everything downstream (FNN, prompt score, windows)
therefore works in one space.

Memory: weights are read tensor by tensor straight into the serving precision (the model is built on the `meta`
device, so no random fp32 copy is ever made, and a bf16/fp16 model never holds an fp32 master copy). The text tower
is only needed to compute prompt anchors: `load_clip(text_tower=False)` leaves it unloaded (on `meta`),
`ClipBackend.load_text` / `release_text` load it from the same verified file on demand and drop it again (about 40%
of ViT-B-16-plus-240's weights).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cnn_tower import apply_tower, fold_batchnorm, is_resnet, resnet_global
from .constants import CLIP_MEAN, CLIP_STD
from .fast_transformer import cpu_bf16_is_fast
from .heap import trim_heap
from .store import ModelStore, StoreError, sha256_file
from .text_encoding import encode_prompts
from .tokenizer import Tokenizer, build_tokenizer

CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
CENTERS_FILE = "centers.safetensors"


class ClipLoadError(Exception):
    """The CLIP model could not be loaded (missing weights, bad file, unknown architecture)."""


class TextTowerUnloaded(ClipLoadError):
    """Text embeddings were asked for while the text tower is not loaded."""


@dataclass(frozen=True)
class ClipSpec:
    """Where a CLIP comes from. Recorded verbatim in every FNN manifest."""

    source: str  # "pretrained" | "file" | "store"
    arch: str | None = None  # open_clip architecture name (pretrained / file)
    pretrained: str | None = None  # open_clip pretrained tag
    path: str | None = None  # local weights file
    name: str | None = None  # store name of an in-house CLIP
    version: str | None = None  # store version of an in-house CLIP
    sha256: str | None = None  # weights checksum, checked on load when present

    def to_manifest(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> ClipSpec:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def label(self) -> str:
        if self.source == "store":
            return f"store:{self.name}@{self.version}"
        if self.source == "pretrained":
            return f"{self.arch}/{self.pretrained}"
        return f"{self.arch}:{Path(self.path or '').name}"


@dataclass
class ClipBackend:
    model: nn.Module
    tokenizer: Tokenizer
    spec: ClipSpec
    device: torch.device
    dtype: torch.dtype
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    image_center: torch.Tensor | None = None
    text_center: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    weights_path: Path | None = None  # the verified weights file: where `load_text` reads the text tower from
    weights_sha256: str | None = None  # its sha256 when known at load (store / pinned file); see `identity`

    # The one place where raw features become the shared embedding space.
    def finish_image(self, raw: torch.Tensor) -> torch.Tensor:
        return _finish(raw, self.image_center)

    def finish_text(self, raw: torch.Tensor) -> torch.Tensor:
        return _finish(raw, self.text_center)

    def encode_text(self, prompts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Embeddings [N, D] of `prompts` on the CPU (fast, length-cut path); loads a released text tower first."""
        self.load_text()
        raw = encode_prompts(self.model, self.tokenizer, prompts, self.device, batch_size, progress)
        return self.finish_text(raw)

    @property
    def text_loaded(self) -> bool:
        return not any(t.is_meta for t in _text_tensors(self.model))

    @property
    def text_reloadable(self) -> bool:
        """True when `load_text` can bring the text tower back after `release_text` (the weights file is known)."""
        return self.weights_path is not None

    def release_text(self) -> None:
        """Drop the text tower's weights (they become shape-only `meta` tensors): serving needs only anchors."""
        if self.text_reloadable:
            _release_text(self.model)
            trim_heap()

    def load_text(self) -> None:
        """Load the text tower's weights from the weights file the model was loaded from, in the serving precision."""
        if self.text_loaded:
            return
        if self.weights_path is None:
            raise TextTowerUnloaded(f"the text tower of CLIP {self.spec.label()} cannot be reloaded (no weights file)")
        if self.weights_sha256 and sha256_file(self.weights_path) != self.weights_sha256:
            raise ClipLoadError(f"CLIP {self.spec.label()}: weights file changed since it was loaded (sha256 differs)")
        _load_weights(self.model, self.weights_path, self.device, self.dtype, part="text")

    def identity(self) -> dict[str, Any]:
        """What text embeddings of this backend depend on: weights, tokenizer, text centre, precision, device type.

        The weights sha256 is computed here when the load did not know it (a `file` spec without a checksum)."""
        if self.weights_sha256 is None and self.weights_path is not None:
            self.weights_sha256 = sha256_file(self.weights_path)
        center = None if self.text_center is None else hashlib.sha256(
            self.text_center.float().contiguous().cpu().numpy().tobytes()).hexdigest()
        return {"weights_sha256": self.weights_sha256 or self.spec.label(), "tokenizer": self.info.get("tokenizer"),
                "text_center_sha256": center, "dtype": str(self.dtype).removeprefix("torch."),
                "device": self.device.type}

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Global embeddings [B, D] (float32, on the model's device) of preprocessed pixels [B, 3, S, S].

        A CNN tower's attention pool runs for its one output token (`cnn_tower.resnet_global`, equal to the
        module's forward up to float rounding); `benchmarks/global_pool.py` times both."""
        pixels = pixels.to(self.device, self.dtype)
        visual = self.model.visual
        if is_resnet(visual):
            return self.finish_image(resnet_global(visual, pixels))
        return self.finish_image(self.model.encode_image(pixels))


def _finish(raw: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    x = F.normalize(raw.float(), dim=-1)
    if center is not None:
        x = F.normalize(x - center.to(x.device), dim=-1)
    return x


# --- device and precision ---------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipLoadError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto': fp16 on GPU; bf16 on CPUs with AMX (`fast_transformer.cpu_bf16_is_fast`; AUROC unchanged on the
    synthetic set: README); fp32 otherwise."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_bf16_is_fast() else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


# --- weights resolution -------------------------------------------------------------------------------------------
def fetch_command(arch: str, tag: str) -> str:
    return f"zsad fetch-weights --model {arch} --pretrained {tag}"


def _pretrained_cfg(arch: str, tag: str) -> dict[str, Any]:
    import open_clip

    if arch not in open_clip.list_models():
        raise ClipLoadError(f"unknown open_clip architecture {arch!r}")
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ClipLoadError(f"unknown pretrained tag {tag!r} for {arch} (known: {tags})")
    return cfg


def cached_pretrained_path(arch: str, tag: str, cache_dir: Path) -> Path | None:
    """The weights file for (arch, tag) if `zsad fetch-weights` already put it in `cache_dir`; never downloads."""
    cfg = _pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for fname in names:
            hit = try_to_load_from_cache(repo_id=repo, filename=fname, cache_dir=str(cache_dir))
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    url = cfg.get("url", "")
    if url:
        candidate = cache_dir / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def fetch_weights(arch: str, tag: str, cache_dir: Path, timeout_s: float = 30.0) -> Path:
    """Download (arch, tag) through open_clip into `cache_dir`. Raises ClipLoadError when offline."""
    import open_clip

    cfg = _pretrained_cfg(arch, tag)
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout_s)))
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub") else cfg.get("url", "")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:  # fail in seconds, not after a minute of retries, when there is no network at all
        socket.create_connection((host, 443), timeout=min(timeout_s, 10.0)).close()
    except OSError as exc:
        raise ClipLoadError(
            f"cannot reach {host} to download {arch}/{tag} ({exc}). This machine is offline: run "
            f"`{fetch_command(arch, tag)}` where there is network access and copy {cache_dir} here "
            "(or mount a pre-fetched model store)."
        ) from exc
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        target = open_clip.download_pretrained(cfg, cache_dir=str(cache_dir))
    except Exception as exc:  # network errors come in many types; all mean "not fetched"
        raise ClipLoadError(
            f"could not download {arch}/{tag} into {cache_dir}: {type(exc).__name__}: {exc}. "
            "This machine may be offline: fetch on a machine with network access and copy the store folder over."
        ) from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
    if not target or not os.path.isfile(target):
        raise ClipLoadError(f"open_clip returned no weights file for {arch}/{tag}")
    return Path(target)


# --- building -------------------------------------------------------------------------------------------------------
# Top-level state-dict names of the text tower: open_clip's CLIP keeps them flat, CustomTextCLIP under `text`.
TEXT_PARTS = ("text", "token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
              "attn_mask")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def is_text_key(key: str) -> bool:
    return key.split(".", 1)[0] in TEXT_PARTS


def _text_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for name, t in [*model.named_parameters(), *model.named_buffers()] if is_text_key(name)]


def _create(arch_or_dir: str) -> nn.Module:
    """An open_clip model on the `meta` device (shapes only, no memory): `_load_weights` gives it its tensors.

    Why meta: building on the CPU first makes (and randomly initialises) a full fp32 copy that the weights then
    overwrite; for ViT-B-16-plus-240 that is 830 MB at the start-up peak."""
    import open_clip

    quiet = logging.getLogger()  # open_clip warns "initialized randomly" here; we load the weights next
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            model = open_clip.create_model(arch_or_dir, pretrained=None, load_weights=False, precision="fp32",
                                           device="meta")
    except Exception as exc:
        raise ClipLoadError(f"cannot build open_clip model {arch_or_dir!r}: {exc}") from exc
    finally:
        quiet.setLevel(level)
    return model.eval()


def read_safetensors(path: Path, keep, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose names pass `keep`, floats cast to `dtype`, read with plain reads.

    Why not `safetensors.load_file`: it maps the whole file, and every page read counts in the process's resident
    set until the mapping closes; reading each tensor into its own buffer costs one tensor of transient memory."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        base = 8 + n
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__"
                                  else -1):
            if name == "__metadata__" or not keep(name):
                continue
            file_dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            start, stop = entry["data_offsets"]
            t = torch.empty(entry["shape"], dtype=file_dtype)
            fh.seek(base + start)
            if stop > start and fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != stop - start:
                raise ClipLoadError(f"{path.name}: tensor {name} is truncated")
            if t.is_floating_point() and file_dtype != dtype:
                t = t.to(dtype)
            out[name] = t.to(device)
    return out


def _read_state_dict(path: Path, keep, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path, keep, dtype, device)
    from open_clip.factory import load_state_dict  # .bin / .pth pretrained checkpoints (weights_only torch.load)

    state = load_state_dict(str(path), device="cpu", weights_only=True)
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in state.items() if keep(k)}


def _load_weights(model: nn.Module, path: Path, device: torch.device, dtype: torch.dtype, part: str = "all") -> None:
    """Give the (meta) model its weights from `path` in `dtype` on `device`: all of them, or all but the text
    tower (`part="image"`), or the text tower only (`part="text"`). Every expected tensor must be in the file."""
    from open_clip.factory import resize_pos_embed, resize_text_pos_embed
    from open_clip.model import convert_to_custom_text_state_dict

    custom = not hasattr(model, "positional_embedding")  # CustomTextCLIP: text under `text.`

    def keep(key: str) -> bool:
        text = is_text_key(convert_key(key))
        return part == "all" or (part == "text") == text

    def convert_key(key: str) -> str:  # old flat text names in a CustomTextCLIP checkpoint
        return "text." + key if custom and key.split(".", 1)[0] in TEXT_PARTS[1:] else key

    try:
        state = _read_state_dict(path, keep, dtype, device)
        if custom and "positional_embedding" in state:
            state = convert_to_custom_text_state_dict(state)
        for name in ("logit_scale", "logit_bias"):
            current = getattr(model, name, None)
            if name in state and current is not None and current.ndim != state[name].ndim:
                state[name] = state[name].reshape(current.shape)
        if part != "text" and "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
            state["logit_bias"] = torch.zeros_like(state["logit_scale"])
        resize_pos_embed(state, model)
        if part != "image":
            resize_text_pos_embed(state, model)
        expected = {k for k in model.state_dict() if keep(k)}
        missing, unexpected = expected - state.keys(), state.keys() - set(model.state_dict())
        if missing or unexpected:
            raise ClipLoadError(f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        model.load_state_dict(state, strict=False, assign=True)
    except ClipLoadError as exc:
        raise ClipLoadError(f"cannot load CLIP weights from {path}: {exc}") from exc
    except Exception as exc:
        raise ClipLoadError(f"cannot load CLIP weights from {path}: {type(exc).__name__}: {exc}") from exc
    for name, buf in list(model.named_buffers()):  # non-persistent buffers are in no file: open_clip's causal mask
        if buf.is_meta and keep(name):
            if not name.endswith("attn_mask"):
                raise ClipLoadError(f"cannot load CLIP weights from {path}: buffer {name} has no value")
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            mask = torch.empty(buf.shape, device=device).fill_(float("-inf")).triu_(1)
            owner.register_buffer(name.rpartition(".")[2], mask, persistent=False)


def _release_text(model: nn.Module) -> None:
    """Replace every text-tower tensor by a `meta` tensor of the same shape (memory freed, shapes kept)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if is_text_key(name) and not t.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            meta = t.detach().to("meta")
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(meta, requires_grad=t.requires_grad)
            else:
                owner._buffers[leaf] = meta


def _load_serving_weights(model: nn.Module, path: Path, device: torch.device, dtype: torch.dtype, part: str,
                          fold_bn: bool) -> int:
    """`_load_weights`, then a CNN tower's BatchNorms folded (`fold_bn`); returns how many were folded.

    The fold needs fp32 weights to round once: a CNN tower is read in fp32, folded, then cast to `dtype` (a tensor
    read in fp32 and cast holds what reading it in `dtype` would)."""
    fold = fold_bn and is_resnet(model.visual)
    _load_weights(model, path, device, torch.float32 if fold else dtype, part)
    if not fold:
        return 0
    folded = fold_batchnorm(model.visual)
    model.to(dtype)
    return folded


def load_clip(
    spec: ClipSpec,
    store_root: str | Path,
    device: str | torch.device = "auto",
    precision: str = "auto",
    hub_cache: str | Path | None = None,
    text_tower: bool = True,
    fold_bn: bool = True,
) -> ClipBackend:
    """Build the CLIP that `spec` names, with its weights, on `device`. Raises ClipLoadError, never random.

    Weights are read once, in the serving precision. With `text_tower=False` the text tower stays unloaded
    (`ClipBackend.load_text` brings it when prompt anchors must be computed). A CNN image tower's BatchNorms are
    folded into their convs (`cnn_tower.fold_batchnorm`: the same function, one pass less; its weights are read in
    fp32, folded, then cast once to the serving precision). `fold_bn=False` keeps the weights file's own tensors and
    modules: for code that compares or reuses them, and a benchmark's baseline."""
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(precision, device)
    store = ModelStore(store_root)
    tokenizer_spec: dict | None = None
    centers: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {}
    sha: str | None = None
    part = "all" if text_tower else "image"

    if spec.source == "pretrained":
        if not spec.arch or not spec.pretrained:
            raise ClipLoadError("a pretrained CLIP needs both an architecture and a pretrained tag")
        cache = Path(hub_cache) if hub_cache else store.root / "_hub"
        path = cached_pretrained_path(spec.arch, spec.pretrained, cache)
        if path is None:
            raise ClipLoadError(
                f"weights for {spec.arch}/{spec.pretrained} are not in {cache}. "
                f"Fetch them once with network access: `{fetch_command(spec.arch, spec.pretrained)}`"
            )
        model = _create(spec.arch)
        info["batchnorms_folded"] = _load_serving_weights(model, path, device, dtype, part, fold_bn)
        arch = spec.arch
    elif spec.source == "file":
        if not spec.arch or not spec.path:
            raise ClipLoadError("a CLIP from a file needs an architecture and a weights path")
        path = Path(spec.path)
        if not path.is_file():
            raise ClipLoadError(f"CLIP weights file {path} does not exist")
        if spec.sha256 and sha256_file(path) != spec.sha256:
            raise ClipLoadError(f"checksum mismatch for CLIP weights {path}")
        sha = spec.sha256
        model = _create(spec.arch)
        info["batchnorms_folded"] = _load_serving_weights(model, path, device, dtype, part, fold_bn)
        arch = spec.arch
    elif spec.source == "store":
        try:
            folder, manifest = store.verify(spec.name or "", spec.version)
        except StoreError as exc:
            raise ClipLoadError(str(exc)) from exc
        weights = folder / str(manifest.get("weights", CLIP_WEIGHTS_FILE))
        if weights.name not in manifest["files"] or weights.parent != folder:
            raise ClipLoadError(f"CLIP {spec.label()}: its weights file is not one the manifest lists with a sha256")
        if spec.sha256 and manifest["files"].get(weights.name) != spec.sha256:
            raise ClipLoadError(f"CLIP {spec.label()} is not the CLIP this model was trained on (sha256 differs)")
        path, sha = weights, manifest["files"][weights.name]
        model = _create(f"local-dir:{folder}")
        try:
            apply_tower(model, manifest.get("tower"))  # a finer CNN grid (cnn_tower): before the weights load
        except ValueError as exc:
            raise ClipLoadError(f"CLIP {spec.label()}: {exc}") from exc
        info["batchnorms_folded"] = _load_serving_weights(model, weights, device, dtype, part, fold_bn)
        tokenizer_spec = manifest.get("tokenizer")
        arch = manifest.get("arch", spec.name)
        if manifest.get("centers"):
            from safetensors.torch import load_file

            centers = load_file(str(folder / manifest["centers"]["file"]))
            info["centers_reference"] = manifest["centers"].get("reference")
        info["clip_manifest"] = {k: manifest.get(k) for k in ("name", "version", "arch", "created_at")}
    else:
        raise ClipLoadError(f"unknown CLIP source {spec.source!r} (use pretrained, file or store)")

    info["tokenizer"] = tokenizer_spec
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    embed_dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") and isinstance(
        model.text_projection, torch.Tensor
    ) else int(model.encode_image(torch.zeros(1, 3, size, size, device=device, dtype=dtype)).shape[-1])
    return ClipBackend(
        model=model,
        tokenizer=build_tokenizer(tokenizer_spec, arch),
        spec=spec,
        device=device,
        dtype=dtype,
        image_size=int(size),
        mean=tuple(cfg.get("mean", CLIP_MEAN)),
        std=tuple(cfg.get("std", CLIP_STD)),
        embed_dim=embed_dim,
        image_center=centers.get("image", None) if centers else None,
        text_center=centers.get("text", None) if centers else None,
        info=info,
        weights_path=path,
        weights_sha256=sha,
    )


def save_store_clip(
    store: ModelStore,
    name: str,
    model: nn.Module,
    model_cfg: dict[str, Any],
    tokenizer_spec: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    centers: dict[str, torch.Tensor] | None = None,
    centers_reference: str | None = None,
    version: str | None = None,
    fp16: bool = True,
) -> str:
    """Publish an in-house CLIP (config + fp16 safetensors [+ centres]) to the store. Returns the version."""
    import tempfile

    from safetensors.torch import save_file

    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().cpu() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        wpath = Path(tmp) / CLIP_WEIGHTS_FILE
        save_file(state, str(wpath))
        files: dict[str, bytes | Path] = {
            CLIP_CONFIG_FILE: json.dumps({"model_cfg": model_cfg}, indent=2).encode(),
            CLIP_WEIGHTS_FILE: wpath,
        }
        manifest: dict[str, Any] = {
            "kind": "clip",
            "arch": name,
            "weights": CLIP_WEIGHTS_FILE,
            "tokenizer": tokenizer_spec,
            **(extra or {}),
        }
        if centers:
            cpath = Path(tmp) / CENTERS_FILE
            save_file({k: v.float().contiguous().cpu() for k, v in centers.items()}, str(cpath))
            files[CENTERS_FILE] = cpath
            manifest["centers"] = {"file": CENTERS_FILE, "reference": centers_reference}
        return store.publish(name, files, manifest, version=version)
