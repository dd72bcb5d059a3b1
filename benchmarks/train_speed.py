"""Tiny-CLIP training speed on this CPU: the v3 recipe against the v4 recipe, interleaved in one run.

    python benchmarks/train_speed.py [--batch 32] [--steps 3] [--rounds 2] [--threads 2]

Variants (one optimiser step = forward + backward + AdamW on `--batch` images with their captions):
- `v3`: 64-px renders upsampled to 192 px, stride-32 tower (6x6 map), NCHW: the shipped recipe.
- `v3_cl`: the same in channels-last.
- `v3_bf16`: `v3_cl` under CPU bf16 autocast (on a Xeon with AVX-512-BF16 and no AMX: 17.3 against 23.8 images/s).
- `v3_384`: the v3 tower given the 12x12 map the old way (64 px upsampled 6x to 384): what v4's grid cost before.
- `v4_nchw`, `v4`: 96-px native renders, stride-8 tower (12x12 map), NCHW and channels-last (the v4 recipe).
- `v4_bf16`: v4 under CPU bf16 autocast (measured, not used: slower on AVX2, and on AVX-512-BF16 without AMX).
- `text_half`: v4 with half the captions' context (48 characters): what a shorter text batch would save.
Data rendering is timed apart (images/s on one core, the v3 world at 64 px and the wide world at 96 px), since a
DataLoader worker renders the next batch while the main process trains.

Ends with `RESULT name=train_speed ...`: images/s per variant and the ratios v4/v3 and v4/v3_384.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from service.cnn_tower import FINE_TOWER
from service.synthetic.captions import CaptionConfig
from service.synthetic.data import TwinBatches
from service.synthetic.train_clip import TrainClipConfig, build_model, clip_loss, preprocess


def _variant(name: str) -> tuple[TrainClipConfig, bool, bool]:
    """(config, channels_last, bf16)."""
    v3 = dict(render_size=64, image_size=192)
    v4 = dict(render_size=96, image_size=96, tower=FINE_TOWER, wide=True)
    return {
        "v3": (TrainClipConfig(**v3), False, False),
        "v3_cl": (TrainClipConfig(**v3), True, False),
        "v3_bf16": (TrainClipConfig(**v3), True, True),
        "v3_384": (TrainClipConfig(render_size=64, image_size=384), False, False),
        "v4_nchw": (TrainClipConfig(**v4), False, False),
        "v4": (TrainClipConfig(**v4), True, False),
        "v4_bf16": (TrainClipConfig(**v4), True, True),
        "text_half": (TrainClipConfig(**v4, context_length=48), True, False),
    }[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="v3,v3_cl,v3_bf16,v3_384,v4_nchw,v4,v4_bf16,text_half")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")

    # Data: one batch per world, and the render speed of each world on this core.
    render_ips = {}
    batches = {}
    for label, size, wide in (("v3", 64, False), ("v4", 96, True)):
        data = TwinBatches(0, args.batch // 2, size, 10, random_kind_prob=0.5, wide=wide,
                           captions=CaptionConfig(random_word_prob=0.5))
        t = time.perf_counter()
        batches[label] = data[0]
        render_ips[label] = args.batch / (time.perf_counter() - t)

    state = {}
    for name in names:
        cfg, nhwc, bf16 = _variant(name)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = copy.copy(batches["v4" if cfg.tower else "v3"])
        if cfg.context_length != 96:
            batch["tokens"] = batch["tokens"][:, : cfg.context_length]
        state[name] = (cfg, nhwc, bf16, model, opt, batch)

    def step(name: str) -> None:
        cfg, nhwc, bf16, model, opt, batch = state[name]
        x = preprocess(batch["images"], cfg.image_size)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            img, txt, scale = model(x, batch["tokens"])
            loss = clip_loss(img.float(), txt.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up (oneDNN primitive creation)
        step(name)
    for _ in range(args.rounds):
        for name in names:  # interleaved: load drifts hit every variant alike
            t = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - t) / args.steps)
    ips = {n: args.batch / float(np.median(times[n])) for n in names}
    for n in names:
        cfg = state[n][0]
        print(f"{n:10s} {ips[n]:7.1f} images/s  ({np.median(times[n]) * 1000:.0f} ms/step of {args.batch}; "
              f"input {cfg.image_size} px)")
    print(f"render: v3 world 64 px {render_ips['v3']:.0f} images/s, wide world 96 px {render_ips['v4']:.0f} images/s "
          "(one core)")
    ratios = ""
    if "v4" in ips and "v3" in ips:
        ratios += f" v4_over_v3={ips['v4'] / ips['v3']:.2f}"
    if "v4" in ips and "v3_384" in ips:
        ratios += f" v4_over_v3_same_grid={ips['v4'] / ips['v3_384']:.2f}"
    print("RESULT name=train_speed " + " ".join(f"{n}_ips={ips[n]:.1f}" for n in names) + ratios
          + f" render_v3_ips={render_ips['v3']:.0f} render_v4_ips={render_ips['v4']:.0f} threads={args.threads}"
          f" batch={args.batch}")


if __name__ == "__main__":
    main()
