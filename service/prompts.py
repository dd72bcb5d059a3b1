"""Prompts: the state/template vocabulary, random-word prompt pairs (the paper's augmentation), prompt ensembles.

A pair is one template, one normal-state phrase, one anomaly-state phrase and the same random words in the object
slot: "a photo of a flawless qbzt ruwa." / "a photo of a damaged qbzt ruwa.". The two prompts differ only in the
state phrase, so what separates them is the state, not the object. No object name is ever needed.

Open details of the paper and our defaults (each a `RandomWordConfig` field): lowercase a-z words of 3-10 letters,
1-3 words per prompt, the words replace the object name, states and templates drawn uniformly.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_VOCABULARY = Path(__file__).parent / "data" / "vocabulary.json"


@dataclass(frozen=True)
class Vocabulary:
    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path | None = None) -> Vocabulary:
        path = Path(path) if path else DEFAULT_VOCABULARY
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read vocabulary {path}: {exc}") from exc
        vocab = cls(**{k: tuple(data.get(k, ())) for k in ("normal_states", "anomalous_states", "templates")})
        for key, items in asdict(vocab).items():
            if not items:
                raise ValueError(f"vocabulary {path}: '{key}' is empty")
            bad = [s for s in items if s.count("{}") != 1]
            if bad:
                raise ValueError(f"vocabulary {path}: every entry of '{key}' needs exactly one '{{}}': {bad[:3]}")
        return vocab

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RandomWordConfig:
    n_pairs: int = 10_000
    words_min: int = 1
    words_max: int = 3
    word_len_min: int = 3
    word_len_max: int = 10
    seed: int = 0

    def __post_init__(self):
        if not (1 <= self.words_min <= self.words_max):
            raise ValueError("need 1 <= words_min <= words_max")
        if not (1 <= self.word_len_min <= self.word_len_max):
            raise ValueError("need 1 <= word_len_min <= word_len_max")
        if self.n_pairs < 1:
            raise ValueError("n_pairs must be >= 1")


@dataclass(frozen=True)
class PromptPair:
    normal: str
    anomalous: str
    template: str = ""  # what the two prompts share, kept for inspection and tests
    words: str = ""


def random_words(rng: random.Random, cfg: RandomWordConfig) -> str:
    count = rng.randint(cfg.words_min, cfg.words_max)
    return " ".join(
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(cfg.word_len_min, cfg.word_len_max)))
        for _ in range(count)
    )


def make_pair(template: str, normal_state: str, anomalous_state: str, obj: str) -> PromptPair:
    return PromptPair(
        template.format(normal_state.format(obj)), template.format(anomalous_state.format(obj)), template, obj
    )


def random_word_pairs(vocab: Vocabulary, cfg: RandomWordConfig, fixed_object: str | None = None) -> list[PromptPair]:
    """`cfg.n_pairs` pairs with random words in the object slot; deterministic for `cfg.seed`.

    `fixed_object` puts that word in the slot instead (the ablation "without random words"), with the same
    sampling of templates and states."""
    rng = random.Random(cfg.seed)
    pairs = []
    for _ in range(cfg.n_pairs):
        template = rng.choice(vocab.templates)
        normal, anomalous = rng.choice(vocab.normal_states), rng.choice(vocab.anomalous_states)
        pairs.append(make_pair(template, normal, anomalous, fixed_object or random_words(rng, cfg)))
    return pairs


def clean_pairs(vocab: Vocabulary, obj: str = "object") -> list[PromptPair]:
    """Every template x normal state x anomalous state with a plain object word: the no-random-word prompts."""
    return [
        make_pair(t, n, a, obj) for t in vocab.templates for n in vocab.normal_states for a in vocab.anomalous_states
    ]


def ensemble(vocab: Vocabulary, obj: str = "object") -> tuple[list[str], list[str]]:
    """WinCLIP's prompt ensemble for s_pr: (normal prompts, anomalous prompts) for one object word."""
    normal = [t.format(s.format(obj)) for t in vocab.templates for s in vocab.normal_states]
    anomalous = [t.format(s.format(obj)) for t in vocab.templates for s in vocab.anomalous_states]
    return normal, anomalous
