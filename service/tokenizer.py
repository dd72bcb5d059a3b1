"""Tokenizers: open_clip's BPE for real checkpoints, a character-level one for the in-house tiny CLIP.

Why a character tokenizer: the paper's augmentation puts *random letter strings* in the prompt. With BPE, a small
text tower only sees such strings as rare sub-word pieces whose embeddings never get trained, so the random words
become noise the FNN overfits to. Characters are all seen in training, so any letter string is representable.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tokenizer = Callable[[Sequence[str]], torch.Tensor]

CHAR_ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789.,'-:;!?()/&"


class CharTokenizer:
    """Lower-cases text and maps each known character to an id.

    Ids: 0 = pad, 1 = start, 2.. = characters, last = end. The end id is the largest, so open_clip's default
    `argmax` text pooling picks the end-of-text position exactly as it does with BPE.
    """

    def __init__(self, context_length: int = 96, alphabet: str = CHAR_ALPHABET):
        self.context_length = context_length
        self.alphabet = alphabet
        self.char_to_id = {c: i + 2 for i, c in enumerate(alphabet)}
        self.sot_id = 1
        self.eot_id = len(alphabet) + 2
        self.vocab_size = len(alphabet) + 3

    def encode(self, text: str) -> list[int]:
        ids = [self.char_to_id[c] for c in " ".join(text.lower().split()) if c in self.char_to_id]
        return [self.sot_id] + ids[: self.context_length - 2] + [self.eot_id]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:ctx]
            ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def build_tokenizer(spec: dict | None, arch: str | None = None) -> Tokenizer:
    """Tokenizer from a manifest's `tokenizer` entry; None means open_clip's own tokenizer for `arch`."""
    if spec and spec.get("type") == "char":
        return CharTokenizer(context_length=int(spec.get("context_length", 96)), alphabet=spec.get("alphabet", CHAR_ALPHABET))
    import open_clip

    return open_clip.get_tokenizer(arch or "ViT-B-32")
