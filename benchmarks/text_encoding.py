"""Benchmark: fast (length-cut) text encoding vs open_clip's encode_text, on ViT-B-16-plus-240 random weights.

Both run in this process on the same 2,000 realistic random-word prompts, same batch size, same threads.
Prints the speed ratio and the max abs difference, then one `RESULT` line.

    python benchmarks/text_encoding.py [--n 2000] [--batch 256]
"""
from __future__ import annotations

import argparse
import resource
import time

import open_clip
import torch

from service.prompts import RandomWordConfig, Vocabulary, random_word_pairs
from service.text_encoding import encode_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--arch", default="ViT-B-16-plus-240")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = open_clip.create_model(args.arch, pretrained=None).eval()
    tok = open_clip.get_tokenizer(args.arch)
    pairs = random_word_pairs(Vocabulary.load(), RandomWordConfig(n_pairs=args.n // 2, seed=0))
    prompts = [p.normal for p in pairs] + [p.anomalous for p in pairs]
    tokens = tok(prompts)
    lengths = (tokens.argmax(-1) + 1).float()

    encode_prompts(model, tok, prompts[:64])  # warm-up both paths
    with torch.inference_mode():
        model.encode_text(tokens[:64])

    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = torch.cat([model.encode_text(tokens[i : i + args.batch]) for i in range(0, len(prompts), args.batch)])
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    fast = encode_prompts(model, tok, prompts, batch_size=args.batch)
    t_fast = time.perf_counter() - t0

    diff = (fast - ref.float()).abs().max().item()
    speedup = t_ref / t_fast
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"prompts={len(prompts)} mean_tokens={lengths.mean():.1f} max_tokens={int(lengths.max())} context=77")
    print(f"open_clip encode_text: {t_ref:.2f}s ({len(prompts) / t_ref:.0f} prompts/s)")
    print(f"fast path:             {t_fast:.2f}s ({len(prompts) / t_fast:.0f} prompts/s)")
    print(f"speedup x{speedup:.2f}, max abs diff {diff:.2e}")
    print(
        f"RESULT name=text_encoding arch={args.arch} n={len(prompts)} speedup={speedup:.2f} "
        f"ref_s={t_ref:.2f} fast_s={t_fast:.2f} max_abs_diff={diff:.2e} peak_rss_mb={rss_mb:.0f}"
    )


if __name__ == "__main__":
    main()
