"""GPU checks in one short run: CUDA placement, fp16 vs fp32 agreement, batching throughput, text fast path.

Run on a machine with a CUDA GPU (CI has none; this is run by hand or on a lent GPU machine):

    python benchmarks/gpu_check.py [--store model_store] [--seconds 10]

1. ViT-B-16-plus-240 with random weights, saved to a weights file and loaded through the real `load_clip` path
   with device=auto / precision=auto: the model must land on CUDA in fp16.
2. fp16 vs fp32 on the GPU: max abs difference of global scores and of heatmaps (same FNN, same images).
3. Full heatmap (global + 365 windows) throughput at batch 1, 8 and 32; global-only throughput.
4. Fast text path vs open_clip encode_text on the GPU (max abs diff in fp32).
5. The embedded default model from the store on CUDA vs CPU: score agreement.
6. With --profile: where one batch-1 heatmap call spends its time (torch.profiler, CPU and CUDA), because the
   first run measured 8.8 images/s at batch 1 against 86 at batch 32: about 100 ms per call that batching hides.
7. The serving pipeline (issue #17): the detector as the service runs it (maps on demand, the answer's map made in
   the batch on the GPU, inputs prepared beforehand as the decode threads do) against the window forward alone
   (`embed_image_and_windows` on pixels already on the GPU), both in images/s at batch 32, in alternating turns;
   the batch-1 p50 latency of that detect; and the largest difference between the map made on the GPU and the one
   made on the host from the grid. Targets: pipeline >= 70% of the forward's images/s at batch 32, p50 <= 15 ms.
Ends with one `RESULT name=gpu_check ...` line; with `$OUT` set (the device machine), the output is also written to
`$OUT/gpu_check.txt` and the RESULT fields to `$OUT/gpu_check.json`.

One run on a lent machine: `PYTHONPATH=. python benchmarks/gpu_check.py --profile --seconds 6` with a timeout
that leaves time to rerun (its duration on a GPU is not measured yet). `--smoke` runs everything on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _random_clip import random_clip_spec
from PIL import Image

from service.clip_backend import load_clip
from service.detector import Detector, load_detector
from service.fnn import FNN
from service.prompts import RandomWordConfig, Vocabulary, random_word_pairs
from service.settings import Settings
from service.text_encoding import encode_prompts

DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def images(n: int, size: int = 240, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 40, 3), dtype=np.uint8)) for _ in range(n)]


def max_diffs(a: list, b: list) -> tuple[float, float]:
    """Largest score and heatmap differences between two runs of `detect` on the same images."""
    scores = max(abs(x.scores[k] - y.scores[k]) for x, y in zip(a, b) for k in x.scores)
    heat = max(float(np.abs(x.heat[k] - y.heat[k]).max()) for x, y in zip(a, b) for k in x.heat)
    return scores, heat


def throughput(det: Detector, batch: int, heatmap: bool, seconds: float) -> float:
    ims = images(batch)
    det.detect(ims, heatmap=heatmap)  # warm-up
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        det.detect(ims, heatmap=heatmap)
        n += batch
    sync()
    return n / (time.perf_counter() - t0)


def profile_call(det: Detector, ims: list[Image.Image]) -> None:
    """Stage timings and the top operators of one heatmap call: is the fixed cost on the GPU or in Python?"""
    from torch.profiler import ProfilerActivity, profile

    det.detect(ims)
    sync()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    det.detect(ims, timings=timings)
    sync()
    print(f"6. one batch-1 call: {1000 * (time.perf_counter() - t0):.1f} ms; stages (ms, not synchronised): "
          + ", ".join(f"{k} {1000 * v:.1f}" for k, v in timings.items()))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        det.detect(ims)
        sync()
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=15))
    if DEV == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=10))


def serving_pipeline(det: Detector, seconds: float, batch: int = 32) -> dict[str, str]:
    """Step 7: the service's detect path against the window forward alone, alternating, plus batch-1 latency."""
    from service.windows import embed_image_and_windows

    det = det.with_full_maps(False)  # what the service loads (state.default_loader)
    s = det.settings
    prepared = [det.prepare(im) for im in images(batch)]  # the decode threads' work, not the inference thread's
    pixels = torch.stack([p.pixels for p in prepared]).to(det.backend.device)

    def forward() -> None:
        embed_image_and_windows(det.backend, pixels, det.window_scales, s.window_stride, s.window_chunk,
                                s.cnn_window_mode)

    def pipeline() -> None:
        for d in det.detect(prepared, map_score=s.default_score):
            d.heat[s.default_score]  # the answer's map, on the host

    def rate(fn, secs: float) -> float:
        fn()
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < secs:
            fn()
            n += batch
        sync()
        return n / (time.perf_counter() - t0)

    fw, pl = [], []
    for _ in range(3):  # alternating turns: both see the same clocks and the same neighbours
        fw.append(rate(forward, seconds / 6))
        pl.append(rate(pipeline, seconds / 6))
    fwd, pipe = float(np.median(fw)), float(np.median(pl))
    one = [det.prepare(images(1, seed=5)[0])]
    lat = []
    for i in range(45 if DEV == "cuda" else 4):
        t0 = time.perf_counter()
        det.detect(one, map_score=s.default_score)[0].heat[s.default_score]
        sync()
        if i >= (5 if DEV == "cuda" else 1):
            lat.append(time.perf_counter() - t0)
    p50 = float(np.percentile(lat, 50)) * 1000
    made = det.detect(one, map_score=s.default_score)[0]
    host = det.with_full_maps(False)
    host.maps_in_batch = False
    ref = host.detect(one)[0].heat[s.default_score]
    diff = float(np.abs(made.heat[s.default_score] - ref).max())
    print(f"7. serving pipeline batch {batch}: {pipe:.1f} images/s vs window forward alone {fwd:.1f} images/s "
          f"({pipe / fwd:.2f}; target >= 0.70); batch-1 detect p50 {p50:.2f} ms (target <= 15); GPU map vs host map "
          f"max diff {diff:.2e}")
    return {"pipeline_b32_ips": f"{pipe:.1f}", "forward_b32_ips": f"{fwd:.1f}", "pipeline_over_forward": f"{pipe / fwd:.3f}",
            "pipeline_b1_p50_ms": f"{p50:.2f}", "device_map_diff": f"{diff:.2e}"}


class _Tee:
    """stdout also into $OUT/gpu_check.txt, so a lent machine's run comes back whole."""

    def __init__(self, path: Path):
        self.file, self.stdout = open(path, "w"), sys.stdout

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.file.write(text)
        self.file.flush()

    def flush(self) -> None:
        self.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="model_store")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--smoke", action="store_true", help="run the script's logic on the CPU (no assertions on CUDA)")
    ap.add_argument("--profile", action="store_true", help="profile one batch-1 heatmap call (step 6)")
    args = ap.parse_args()
    global DEV
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out_dir is not None:
        sys.stdout = _Tee(out_dir / "gpu_check.txt")
    if args.smoke:
        DEV = "cpu"
    else:
        assert torch.cuda.is_available(), "no CUDA device"
        print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    out: dict[str, str] = {}

    with tempfile.TemporaryDirectory() as tmp:
        spec = random_clip_spec(tmp)
        b16 = load_clip(spec, tmp, device="auto" if DEV == "cuda" else "cpu", precision="auto" if DEV == "cuda" else "bf16")
        param = next(b16.model.parameters())
        print(f"1. placement: device={b16.device} dtype={b16.dtype} param on {param.device} {param.dtype}")
        assert DEV == "cpu" or (b16.device.type == "cuda" and param.is_cuda and b16.dtype == torch.float16)
        out["placement"] = "cuda_fp16"

        b32 = load_clip(spec, tmp, device=DEV, precision="fp32")
        torch.manual_seed(1)
        fnn = FNN(b16.embed_dim)
        vocab = Vocabulary.load()
        settings = Settings(model_store=Path(tmp), device=DEV)
        det16 = Detector(b16, fnn.to(DEV), {"name": "random", "version": "v0"}, vocab, settings)
        det32 = Detector(b32, FNN(b32.embed_dim).to(DEV), {"name": "random", "version": "v0"}, vocab, settings)
        det32.fnn.load_state_dict(fnn.state_dict())
        ims = images(4)
        score_diff, heat_diff = max_diffs(det16.detect(ims), det32.detect(ims))
        print(f"2. fp16 vs fp32: max score diff {score_diff:.2e}, max heat diff {heat_diff:.2e}")
        out["fp16_score_diff"] = f"{score_diff:.2e}"
        out["fp16_heat_diff"] = f"{heat_diff:.2e}"

        for batch in ((1, 8, 32) if DEV == "cuda" else (1,)):
            ips = throughput(det16, batch, True, args.seconds)
            print(f"3. fp16 heatmap batch {batch}: {ips:.1f} images/s")
            out[f"heatmap_b{batch}_ips"] = f"{ips:.1f}"
        ips = throughput(det16, 32, False, args.seconds / 2)
        print(f"3. fp16 global-only batch 32: {ips:.1f} images/s")
        out["global_b32_ips"] = f"{ips:.1f}"
        if DEV == "cuda":
            print(f"   peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            out["peak_gpu_gib"] = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
        if args.profile:
            profile_call(det16, images(1))
        try:
            out.update(serving_pipeline(det16, args.seconds, 32 if DEV == "cuda" else 2))
        except Exception as exc:  # noqa: BLE001 - the check must still report the rest
            print(f"7. serving pipeline: failed ({type(exc).__name__}: {exc})")

        pairs = random_word_pairs(vocab, RandomWordConfig(n_pairs=1000 if DEV == "cuda" else 20, seed=0))
        prompts = [p.normal for p in pairs] + [p.anomalous for p in pairs]
        tok = b32.tokenizer
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            ref = torch.cat([b32.model.encode_text(tok(prompts[i:i + 500]).to(DEV)).float().cpu()
                             for i in range(0, len(prompts), 500)])
            sync()
            t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = encode_prompts(b32.model, tok, prompts, DEV, batch_size=500)
        t_fast = time.perf_counter() - t0
        diff = float((fast - ref).abs().max())
        print(f"4. text fast path on GPU fp32: x{t_ref / t_fast:.2f}, max abs diff {diff:.2e}")
        out["text_speedup"] = f"{t_ref / t_fast:.2f}"
        out["text_diff"] = f"{diff:.2e}"
        del b16, b32, det16, det32
        if DEV == "cuda":
            torch.cuda.empty_cache()

    try:
        gpu = load_detector(Settings(model_store=Path(args.store), device=DEV))
        cpu = load_detector(Settings(model_store=Path(args.store), device="cpu", precision="fp32"))
        ims = images(4, 128)
        diff, hd = max_diffs(gpu.detect(ims), cpu.detect(ims))
        print(f"5. embedded model {gpu.name}@{gpu.version}: cuda fp16 vs cpu fp32 score diff {diff:.2e}, heat diff {hd:.2e}")
        out["embedded_score_diff"] = f"{diff:.2e}"
        out["embedded_ips_b32"] = f"{throughput(gpu, 32, True, args.seconds / 2):.1f}"
    except Exception as exc:  # noqa: BLE001 - the check must still report the rest
        print(f"5. embedded model: skipped ({exc})")
    print("RESULT name=gpu_check " + " ".join(f"{k}={v}" for k, v in out.items()))
    if out_dir is not None:
        (out_dir / "gpu_check.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
