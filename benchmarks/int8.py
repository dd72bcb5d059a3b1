"""Benchmark: is int8 worth a serving precision on this CPU? torch dynamic int8 and OpenVINO against fp32 and bf16.

Part 1, speed and map agreement, ViT-B-16-plus-240 with seeded random weights (`_random_clip.py`), 240 px, one
batch of `--images` images: the global + window forward of a WinCLIP heatmap (scales 2 and 3, stride 1: patch
embedding, 12 blocks over the global sequence and all 365 windows, pooling, projection), timed best of `--reps`,
the variants interleaved rep by rep so they share the machine's load:
* `fp32`: the service's path (`embed_image_and_windows`: fused oneDNN linears on CPU).
* `bf16`: the same path with bf16 weights. On a CPU without AVX512-BF16/AMX (this one: AVX2 only) oneDNN has no bf16
  kernels: the linears run PyTorch's generic bf16 matmul (bf16 storage, conversion to fp32 around the products), so
  bf16 saves memory, not time, here.
* `torch_int8`: `torch.ao.quantization.quantize_dynamic` (qint8 weights per channel, activations quantised per call,
  fbgemm on x86) of every linear of the blocks (qkv, out, fc, proj), run through the same fused block layout.
* `ov_fp32` / `ov_int8`: OpenVINO (CPU plugin) running the same forward converted from torch
  (`openvino.convert_model`); int8 by NNCF post-training quantisation (`nncf.quantize`, transformer preset, calibrated
  on `--calib` random-pixel batches). OpenVINO's bf16 needs AVX512-BF16/AMX, so it is reported as unavailable here.
For each: ms per image, speed against bf16 and fp32, and the max |map - fp32 map| of the WinCLIP prompt-score map at
240 px (random unit text anchors, temperature 0.07, as benchmarks/heatmap.py).

Part 2, quality with the embedded model (default@v3, the in-house tiny CLIP's ModifiedResNet tower, its 4 views):
image and pixel AUROC on the synthetic held-out kinds (seed 20261126, as benchmarks/precision_auroc.py) for fp32,
bf16, torch int8 (dynamic quantisation of the tower's linears: its attention pool's q/k/v/c projections; torch has no
dynamic int8 convolution) and OpenVINO fp32 / int8 (the conv backbone converted; NNCF calibrated on normal images of
*seen* kinds, never on held-out ones; the attention pool stays in torch).

Caveat, printed with the numbers: random weights lack the outlier activations of trained CLIPs (a few channels a
hundred times larger than the rest), which are what makes per-tensor int8 activations lose accuracy on real
checkpoints; the map differences of part 1 are therefore a lower bound.

Needs the bench extra (`pip install -e .[bench]`: openvino, nncf); not a serving dependency. Ends with one
`RESULT name=int8 ...` line.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/int8.py [--images 2] [--reps 3] [--skip-auroc]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service import fast_transformer, windows
from service.aggregate import upsample_map, winclip_map
from service.clip_backend import load_clip
from service.window_grid import window_indices

ARCH = "ViT-B-16-plus-240"
SCALES = (2, 3)
CAVEAT = ("random weights lack the outlier activations of trained CLIPs, which are what costs per-tensor int8 its "
          "accuracy on real checkpoints: these map differences are a lower bound")


# --- torch dynamic int8 ---------------------------------------------------------------------------------------------
class _BlockLinears(nn.Module):
    """The four linears of one open_clip block as nn.Linear modules, so `quantize_dynamic` can convert them."""

    def __init__(self, blk: nn.Module):
        super().__init__()
        attn, mlp = blk.attn, blk.mlp
        self.qkv = _as_linear(attn.in_proj_weight, attn.in_proj_bias)
        self.out = _as_linear(attn.out_proj.weight, attn.out_proj.bias)
        self.fc = _as_linear(mlp.c_fc.weight, mlp.c_fc.bias)
        self.proj = _as_linear(mlp.c_proj.weight, mlp.c_proj.bias)


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight.float())
        if bias is not None:
            lin.bias.copy_(bias.float())
    return lin


def int8_block_forward(qlin: dict[int, nn.Module]):
    """A drop-in for `fast_transformer.block_forward` whose four linears are the quantised modules of `qlin`."""

    def forward(blk: nn.Module, x: torch.Tensor, shapes: list[tuple[int, int]], first_only: bool = False,
                causal: bool = False) -> torch.Tensor:
        q = qlin[id(blk)]
        width = x.shape[-1]
        heads = blk.attn.num_heads
        hd = width // heads
        h = blk.ln_1(x)
        qkv = q.qkv(h)
        outs, t0 = [], 0
        for n, length in shapes:
            qq, k, v = qkv[t0 : t0 + n * length].view(n, length, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            if first_only:
                qq = qq[:, :, :1]
            o = F.scaled_dot_product_attention(qq, k, v, is_causal=causal).transpose(1, 2)
            outs.append(o.reshape(-1, width))
            t0 += n * length
        o = torch.cat(outs)
        if first_only:
            x = x[torch.cat([t + torch.arange(n) * length for t, (n, length) in
                             zip(fast_transformer.offsets(shapes), shapes)])]
        x = x + blk.ls_1(q.out(o))
        return x + blk.ls_2(q.proj(blk.mlp.gelu(q.fc(blk.ln_2(x)))))

    return forward


def quantize_blocks(blocks) -> dict[int, nn.Module]:
    torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "x86"
    return {id(blk): quantize_linears(_BlockLinears(blk)) for blk in blocks}


def quantize_linears(module: nn.Module) -> nn.Module:
    """`quantize_dynamic` of every nn.Linear: int8 weights per output channel, activations per tensor per call."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


@contextlib.contextmanager
def patched_block_forward(fn):
    saved = windows.block_forward
    windows.block_forward = fn
    try:
        yield
    finally:
        windows.block_forward = saved


# --- OpenVINO ------------------------------------------------------------------------------------------------------------
class WindowForward(nn.Module):
    """Global + window raw embeddings of pixels, with plain torch ops only (what OpenVINO converts)."""

    def __init__(self, visual: nn.Module, grid: int):
        super().__init__()
        self.visual = visual
        self.indices = {s: window_indices(grid, grid, s, 1) for s in SCALES}

    def forward(self, pixels: torch.Tensor):
        tokens = windows.vit_tokens(self.visual, pixels)
        glob, win = windows.vit_embed(self.visual, tokens, self.indices, chunk=1 << 30)
        return (glob, *[win[s] for s in SCALES])


@contextlib.contextmanager
def plain_linears():
    """Turn the oneDNN fused linear off (its ops do not convert): F.linear everywhere."""
    saved = fast_transformer._LINEAR_POINTWISE
    fast_transformer._LINEAR_POINTWISE = None
    try:
        yield
    finally:
        fast_transformer._LINEAR_POINTWISE = saved


def ov_compile(module: nn.Module, example: torch.Tensor, int8: bool, calib: list[torch.Tensor], transformer: bool):
    import openvino as ov

    with plain_linears(), torch.no_grad():
        model = ov.convert_model(module, example_input=example)
    if int8:
        import nncf

        logging.getLogger("nncf").setLevel(logging.ERROR)
        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
        model = nncf.quantize(model, nncf.Dataset([c.numpy() for c in calib]), subset_size=len(calib),
                              fast_bias_correction=None, **kwargs)  # None: no bias correction (minutes on 2 cores)
    core = ov.Core()
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS":
                                             torch.get_num_threads()})


def ov_run(compiled, pixels: torch.Tensor) -> list[torch.Tensor]:
    out = compiled(pixels.numpy())
    return [torch.from_numpy(out[i].copy()) for i in range(len(compiled.outputs))]


# --- part 1 ---------------------------------------------------------------------------------------------------------------
def prompt_map(raw: list[torch.Tensor], backend, text: torch.Tensor, grid: int) -> torch.Tensor:
    """WinCLIP prompt-score map [B, 240, 240] from raw (global, scale 2, scale 3) embeddings."""
    def score(e: torch.Tensor) -> torch.Tensor:
        return (backend.finish_image(e) @ text.T / 0.07).softmax(dim=-1)[..., 1]

    glob, *wins = raw
    b = glob.shape[0]
    win = {s: score(w.reshape(-1, w.shape[-1])).reshape(b, -1) for s, w in zip(SCALES, wins)}
    idx = {s: window_indices(grid, grid, s, 1) for s in SCALES}
    return upsample_map(winclip_map(score(glob), win, idx, (grid, grid)), (240, 240))


def torch_forward(backend, pixels: torch.Tensor) -> list[torch.Tensor]:
    visual = backend.model.visual
    tokens = windows.vit_tokens(visual, pixels.to(backend.dtype))
    grid = windows.feature_grid(visual, (240, 240))[0]
    glob, win = windows.vit_embed(visual, tokens, {s: window_indices(grid, grid, s, 1) for s in SCALES}, 1024)
    return [t.float() for t in (glob, *[win[s] for s in SCALES])]


def part_speed(args, tmp: str) -> dict[str, str]:
    from _random_clip import random_clip_spec

    spec = random_clip_spec(tmp, ARCH)
    fp32 = load_clip(spec, tmp, device="cpu", precision="fp32", text_tower=False)
    bf16 = load_clip(spec, tmp, device="cpu", precision="bf16", text_tower=False)
    grid = windows.feature_grid(fp32.model.visual, (240, 240))[0]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, 240, 240, generator=gen)
    text = F.normalize(torch.randn(2, fp32.embed_dim, generator=gen), dim=-1)
    calib = [torch.randn(args.images, 3, 240, 240, generator=gen) for _ in range(args.calib)]

    qlin = quantize_blocks(fp32.model.visual.transformer.resblocks)
    q_forward = int8_block_forward(qlin)

    def run_int8(p):
        with patched_block_forward(q_forward):
            return torch_forward(fp32, p)

    builders = {"fp32": lambda: (lambda p: torch_forward(fp32, p)), "bf16": lambda: (lambda p: torch_forward(bf16, p)),
                "torch_int8": lambda: run_int8}
    if not args.no_openvino:
        wf = WindowForward(fp32.model.visual, grid).eval()
        for name, int8 in (("ov_fp32", False), ("ov_int8", True)):
            builders[name] = lambda int8=int8: (lambda p, c=ov_compile(wf, pixels, int8, calib, transformer=True):
                                                ov_run(c, p))
    maps, best, fns = {}, {}, {}
    out: dict[str, str] = {}

    def report(name: str) -> None:
        ms = best[name] / args.images * 1e3
        diff = float((maps[name] - maps["fp32"]).abs().max())
        vs_bf16, vs_fp32 = best["bf16"] / best[name], best["fp32"] / best[name]
        print(f"{name:>10}: {ms:7.0f} ms/image  x{vs_bf16:.2f} vs bf16  x{vs_fp32:.2f} vs fp32  "
              f"max|map - fp32| {diff:.4f}", flush=True)
        out.update({f"{name}_ms": f"{ms:.0f}", f"{name}_vs_bf16": f"{vs_bf16:.2f}", f"{name}_map_diff": f"{diff:.4f}"})

    # Each variant is built, warmed up (its map) and timed best of `reps`; fp32 is timed again next to each later
    # variant, so every ratio pairs two timings taken under the same load (the machine may be shared).
    for name, build in builders.items():
        t = time.perf_counter()
        try:
            fns[name] = build()
        except Exception as exc:  # noqa: BLE001 - report, do not abort the other variants
            print(f"{name}: unavailable ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
            continue
        if name.startswith("ov_"):
            print(f"{name}: conversion{' and NNCF calibration' if name == 'ov_int8' else ''} "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        with torch.inference_mode():
            maps[name] = prompt_map(fns[name](pixels), fp32, text, grid)
            for _ in range(args.reps):
                for timed in dict.fromkeys(["fp32", name]):
                    t0 = time.perf_counter()
                    fns[timed](pixels)
                    best[timed] = min(best.get(timed, float("inf")), time.perf_counter() - t0)
        if name == "bf16":
            report("fp32")
        if "bf16" in best and name != "fp32":
            report(name)
    print("ov_bf16: unavailable (OpenVINO's bf16 needs AVX512-BF16 or AMX; this CPU has AVX2 only)")
    print(f"map range fp32 {float(maps['fp32'].min()):.3f}..{float(maps['fp32'].max()):.3f}; caveat: {CAVEAT}")
    return out


# --- part 2 ----------------------------------------------------------------------------------------------------------------
def _pool_forward_via_modules(visual: nn.Module):
    """AttentionPool2d.forward over the whole map through `windows._attnpool_sequences` (module calls), so the pool's
    linears can be quantised modules. Equal to open_clip's forward (a window covering the whole grid)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        full = torch.arange(x.shape[-2] * x.shape[-1]).view(1, -1)
        return windows.cnn_window_embeddings(visual, x, full, 1 << 30)[:, 0]

    return forward


def detector_variant(store: Path, variant: str, calib_images):
    from service.detector import load_detector
    from service.settings import Settings

    precision = "bf16" if variant == "bf16" else "fp32"
    det = load_detector(Settings(model_store=store, device="cpu", precision=precision))
    visual = det.backend.model.visual
    if variant == "torch_int8":
        torch.backends.quantized.engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "x86"
        visual.attnpool = quantize_linears(visual.attnpool)
        visual.attnpool.forward = _pool_forward_via_modules(visual)
    elif variant.startswith("ov_"):
        backbone = _Backbone(visual).eval()
        size = det.backend.image_size
        pixels = [det.prepare(im).pixels[None] for im in calib_images]
        compiled = ov_compile(backbone, torch.zeros(1, 3, size, size), variant == "ov_int8", pixels, transformer=False)
        visual.stem = lambda x, c=compiled: ov_run(c, x.float().contiguous())[0]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            setattr(visual, name, nn.Identity())
    return det


class _Backbone(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return windows.cnn_feature_map(self.visual, x)


def part_auroc(args, tmp: str) -> dict[str, str]:
    import numpy as np
    from _synthetic_detection import synthetic_set
    from sklearn.metrics import roc_auc_score

    from service.evaluation.readers import load_mask
    from service.synthetic.world import HELD_OUT_KINDS, TRAIN_KINDS

    samples, images = synthetic_set(Path(tmp) / "test", HELD_OUT_KINDS, 20261126, args.n_good, args.n_defect)
    calib_samples, calib_images = synthetic_set(Path(tmp) / "calib", TRAIN_KINDS[:4], 777, 2, 1)
    seen = [im for s, im in zip(calib_samples, calib_images) if not s.label]  # normal images of seen kinds only
    out, ref = {}, None
    for variant in ("fp32", "bf16", "torch_int8", "ov_fp32", "ov_int8"):
        try:
            det = detector_variant(Path(args.store), variant, seen[: args.calib * 2])
        except Exception as exc:  # noqa: BLE001
            print(f"{variant}: unavailable ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        det.detect(images[:2])
        labels, scores, masks, heats = [], [], [], []
        t0 = time.perf_counter()
        for i in range(0, len(images), 16):
            for s, d in zip(samples[i : i + 16], det.detect(images[i : i + 16])):
                labels.append(s.label)
                scores.append(d.scores["combined"])
                heat = d.heat["combined"]
                masks.append((load_mask(s.mask_path) if s.label else np.zeros(heat.shape, bool)).ravel())
                heats.append(heat.ravel())
        secs = time.perf_counter() - t0
        img, pix = roc_auc_score(labels, scores), roc_auc_score(np.concatenate(masks), np.concatenate(heats))
        if ref is None:
            ref = (img, pix, np.array(scores), np.concatenate(heats))
        diff_s = float(np.abs(np.array(scores) - ref[2]).max())
        diff_m = float(np.abs(np.concatenate(heats) - ref[3]).max())
        print(f"{variant:>10}: {secs:.1f} s for {len(images)} images, image AUROC {img:.4f} ({img - ref[0]:+.4f}), "
              f"pixel AUROC {pix:.4f} ({pix - ref[1]:+.4f}), max |score - fp32| {diff_s:.4f}, max |map - fp32| "
              f"{diff_m:.4f}")
        out.update({f"auroc_{variant}_image_delta": f"{img - ref[0]:+.4f}",
                    f"auroc_{variant}_pixel_delta": f"{pix - ref[1]:+.4f}", f"auroc_{variant}_map_diff": f"{diff_m:.4f}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2, help="images per timed batch (part 1)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calib", type=int, default=4, help="NNCF calibration batches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--n-good", type=int, default=40)
    ap.add_argument("--n-defect", type=int, default=10)
    ap.add_argument("--skip-auroc", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--no-openvino", action="store_true", help="part 1 without the OpenVINO variants")
    args = ap.parse_args()
    with contextlib.suppress(PermissionError):
        os.nice(-10)  # shared machine: keep this run's CPU share steady (the variants are interleaved anyway)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, quantized engines {torch.backends.quantized.supported_engines}")
    result: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            result.update(part_speed(args, tmp))
        if not args.skip_auroc:
            result.update(part_auroc(args, tmp))
    adopt = [n for n in ("torch_int8", "ov_int8", "ov_fp32") if float(result.get(f"{n}_vs_bf16", 0)) >= 1.5
             and float(result.get(f"{n}_map_diff", 1)) <= 0.01]
    result["adopt"] = ",".join(adopt) or "none"
    print("RESULT name=int8 " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
