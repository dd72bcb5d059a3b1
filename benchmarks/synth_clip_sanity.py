"""Sanity check of an in-house CLIP on the synthetic world: image AUROC of the plain prompt score s_pr.

No labels are used to fit anything: s_pr is WinCLIP's two-class prompt score with the generic word "object"
(softmax over cos / 0.07 between the image embedding and the mean normal / anomalous prompt-ensemble embeddings of
`service/prompts.py`). Test images come from the dataset seed stream (never the training streams), so seen kinds are
seen *kinds*, not seen images. Held-out kinds were never shown to the CLIP.

    .venv/bin/python benchmarks/synth_clip_sanity.py --store model_store --name tiny-factory-clip
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.clip_backend import ClipSpec, load_clip
from service.prompts import RandomWordConfig, Vocabulary, ensemble, random_word_pairs
from service.scoring import anchors_from_embeddings, s_pr
from service.synthetic.dataset import STREAM_DATASET
from service.synthetic.train_clip import preprocess
from service.synthetic.world import (
    DEFECTS,
    HELD_OUT_KINDS,
    KINDS,
    Defect,
    render,
    render_twins,
    sample_scene,
    seeded_rng,
)


def make_set(kind: str, n_good: int, n_per_defect: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Independent scenes (not twins): n_good clean images and n_per_defect images of each defect type."""
    k = KINDS.index(kind)
    images, labels, types = [], [], []
    for i in range(n_good):
        images.append(render(sample_scene(seeded_rng(seed, STREAM_DATASET, k, 1, i), kind=kind), size)[0])
        labels.append(0)
        types.append("good")
    for d, defect in enumerate(DEFECTS):
        for i in range(n_per_defect):
            rng = seeded_rng(seed, STREAM_DATASET, k, 10 + d, i)
            scene = sample_scene(rng, kind=kind)
            images.append(render_twins(scene, Defect(defect, int(rng.integers(2**31))), size).defective)
            labels.append(1)
            types.append(defect)
    return np.stack(images), np.array(labels), types


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="model_store")
    p.add_argument("--name", default="tiny-factory-clip")
    p.add_argument("--version", default=None)
    p.add_argument("--n-good", type=int, default=35, help="clean test images per kind")
    p.add_argument("--n-per-defect", type=int, default=5, help="test images per kind and defect type")
    p.add_argument("--size", type=int, default=None, help="render size (default: the CLIP's training render size)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    backend = load_clip(ClipSpec("store", name=args.name, version=args.version), args.store, device="cpu", precision="fp32")
    from service.store import ModelStore

    manifest = ModelStore(args.store).manifest(args.name, args.version)
    size = args.size or int(manifest.get("synthetic_world", {}).get("render_size", 64))
    vocab = Vocabulary.load()
    normal, anomalous = ensemble(vocab, "object")

    def embed_text(prompts: list[str], centred: bool) -> torch.Tensor:
        if centred:
            return backend.encode_text(prompts)
        from service.text_encoding import encode_prompts

        return F.normalize(encode_prompts(backend.model, backend.tokenizer, prompts), dim=-1)

    anchors = {c: anchors_from_embeddings("object", embed_text(normal, c), embed_text(anomalous, c)) for c in (True, False)}
    # Diagnostic: the same score with random letter strings in the object slot (the paper's prompts). If the text
    # tower learned that random words carry no state, these anchors separate images about as well.
    pairs = random_word_pairs(vocab, RandomWordConfig(n_pairs=2000, seed=1))
    rw_anchor = anchors_from_embeddings("random words", embed_text([q.normal for q in pairs], True),
                                        embed_text([q.anomalous for q in pairs], True))
    results: dict[str, dict] = {}
    t0 = time.time()
    n_images = 0
    for kind in KINDS:
        images, labels, types = make_set(kind, args.n_good, args.n_per_defect, size, args.seed)
        n_images += len(images)
        pixels = preprocess(torch.from_numpy(images).permute(0, 3, 1, 2), backend.image_size)
        raw = torch.cat([backend.model.encode_image(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
        row = {}
        for centred in (True, False):
            emb = backend.finish_image(raw) if centred else F.normalize(raw.float(), dim=-1)
            score = s_pr(emb, anchors[centred]).numpy()
            key = "centred" if centred else "plain"
            row[key] = float(roc_auc_score(labels, score))
            if centred:
                row["random_words"] = float(roc_auc_score(labels, s_pr(emb, rw_anchor).numpy()))
            good = np.array([t == "good" for t in types])
            row[f"{key}_per_defect"] = {
                d: float(roc_auc_score(np.r_[np.zeros(good.sum()), np.ones(sum(t == d for t in types))],
                                       np.r_[score[good], score[np.array([t == d for t in types])]]))
                for d in DEFECTS
            }
        results[kind] = row
    elapsed = time.time() - t0

    def mean(kinds, key):
        return float(np.mean([results[k][key] for k in kinds]))

    seen = [k for k in KINDS if k not in HELD_OUT_KINDS]
    summary = {
        "clip": f"{args.name}@{manifest['version']}",
        "render_size": size,
        "images": n_images,
        "images_per_kind": {"good": args.n_good, "defective": args.n_per_defect * len(DEFECTS)},
        "seconds": round(elapsed, 1),
        "s_pr_image_auroc": {
            "seen_centred": round(mean(seen, "centred"), 4),
            "held_out_centred": round(mean(HELD_OUT_KINDS, "centred"), 4),
            "seen_plain": round(mean(seen, "plain"), 4),
            "held_out_plain": round(mean(HELD_OUT_KINDS, "plain"), 4),
            "seen_random_word_anchors": round(mean(seen, "random_words"), 4),
            "held_out_random_word_anchors": round(mean(HELD_OUT_KINDS, "random_words"), 4),
        },
        "per_kind_centred": {k: round(results[k]["centred"], 4) for k in KINDS},
        "held_out_per_defect_centred": {
            d: round(float(np.mean([results[k]["centred_per_defect"][d] for k in HELD_OUT_KINDS])), 4) for d in DEFECTS
        },
        "seen_per_defect_centred": {
            d: round(float(np.mean([results[k]["centred_per_defect"][d] for k in seen])), 4) for d in DEFECTS
        },
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
