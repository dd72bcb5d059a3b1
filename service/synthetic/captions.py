"""Training captions for the synthetic world: template x state x optional colour x kind, plus random letter strings.

Why random strings: the paper's augmentation puts random words in prompts and expects them to move embeddings
without carrying state. A tiny text tower only behaves like that if it has seen many captions where random strings
sit in every slot (object name, adjective, prefix, suffix) under both normal and anomalous states. The character
tokenizer makes any string representable; these captions teach the tower that only state words matter for state.

The state words come from `service/data/vocabulary.json` (the prompt vocabulary the detector uses) plus extra
normal words, anomaly words, defect adjectives and "with a {defect}" phrases, some with a location.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..prompts import Vocabulary

KIND_NOUNS: dict[str, tuple[str, ...]] = {
    "bottle_cap": ("bottle cap", "bottle top", "cap", "bottle lid"),
    "hex_nut": ("hex nut", "nut", "hexagon nut", "metal nut"),
    "screw": ("screw", "bolt", "wood screw"),
    "pill": ("pill", "capsule", "tablet", "two-colour pill"),
    "cable": ("cable", "wire", "cable with wires", "electric cable"),
    "gear": ("gear", "cog", "gear wheel", "cogwheel"),
    "wood": ("wood", "wooden board", "wood surface", "piece of wood", "wood grain"),
    "fabric": ("fabric", "cloth", "woven fabric", "textile", "carpet"),
    "leather": ("leather", "leather surface", "piece of leather", "hide"),
    "metal": ("brushed metal", "metal plate", "metal surface", "sheet metal"),
    "widget": ("part", "component", "workpiece", "piece", "machined part"),
    "pattern": ("surface", "material", "patterned surface", "textured material"),
    "weave": ("woven fabric", "knitted fabric", "weave", "textile", "knit", "mesh"),
    "label": ("label", "printed label", "tag", "sticker", "printed card"),
}
GENERIC_NOUNS = ("object", "item", "part", "product")
COLOUR_WORDS: dict[str, tuple[str, ...]] = {"gray": ("gray", "grey"), "gold": ("gold", "golden")}

EXTRA_NORMAL = ("good {}", "normal {}", "intact {}", "clean {}", "{} in good condition", "pristine {}", "{} with no defects")
EXTRA_ANOMALOUS = ("defective {}", "broken {}", "faulty {}", "abnormal {}", "{} with an anomaly", "flawed {}", "bad {}")
DEFECT_NOUNS: dict[str, tuple[str, ...]] = {
    "scratch": ("scratch", "scratch mark", "scrape"),
    "crack": ("crack", "fracture", "crack line"),
    "hole": ("hole", "puncture", "hole in it"),
    "stain": ("stain", "dirty spot", "smudge", "contamination"),
    "missing_piece": ("missing piece", "chipped edge", "piece missing", "broken-off part"),
    "deformation": ("deformation", "dent", "bend", "bulge"),
    "colour_spot": ("colour spot", "color spot", "spot of paint", "discoloured spot"),
    "pinhole": ("pinhole", "tiny hole", "small pore", "speck"),
    "fine_scratch": ("hairline scratch", "fine scratch", "thin scratch"),
    "colour_cast": ("wrong colour", "colour shift", "color cast", "faded colour"),
    "wrong_material": ("wrong material", "foreign material", "wrong finish"),
    "blur": ("blur", "smear", "blurred print", "washed-out surface"),
    "misprint": ("misprint", "double print", "shifted print", "printing error"),
    "warp": ("warp", "stretched shape", "skewed shape", "distortion"),
}
DEFECT_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "scratch": ("scratched",),
    "crack": ("cracked", "fractured"),
    "hole": ("punctured", "perforated", "holed"),
    "stain": ("stained", "dirty", "contaminated", "smudged"),
    "missing_piece": ("chipped", "incomplete", "broken-off"),
    "deformation": ("deformed", "dented", "bent", "misshapen", "warped"),
    "colour_spot": ("discoloured", "spotted", "discolored"),
    "pinhole": ("pitted", "speckled", "pierced"),
    "fine_scratch": ("scratched", "scuffed"),
    "colour_cast": ("discoloured", "off-colour", "faded", "tinted"),
    "wrong_material": ("wrong-material", "off-spec", "mismatched"),
    "blur": ("blurred", "smeared", "smudged"),
    "misprint": ("misprinted", "double-printed", "badly printed"),
    "warp": ("warped", "stretched", "skewed", "distorted"),
}
CLOSEUP_TEMPLATES = (
    "a close-up photo of a {}.", "a close-up photo of the {}.", "a cropped photo of a {}.",
    "a cropped photo of the {}.", "a macro photo of a {}.", "a zoomed-in photo of the {}.", "a close-up of a {}.",
)
EXTRA_TEMPLATES = ("{}.", "an image of a {}.", "a picture of the {}.", "there is a {} in the photo.", "a {} on the line.")
LOCATION_PHRASES = ("on the {}", "at the {}", "in the {} area")


@dataclass(frozen=True)
class CaptionConfig:
    generic_prob: float = 0.2  # generic noun (object/item/part/product) instead of the kind's name
    colour_prob: float = 0.4
    random_word_prob: float = 0.5  # share of captions with 1-3 random letter strings
    words_min: int = 1
    words_max: int = 3
    word_len_min: int = 3
    word_len_max: int = 10
    location_prob: float = 0.5  # of "with a {defect}" captions, when the location is known


@lru_cache(maxsize=4)
def _vocab(path: str | None = None) -> Vocabulary:
    return Vocabulary.load(path)


def random_string(rng: np.random.Generator, cfg: CaptionConfig) -> str:
    n = int(rng.integers(cfg.word_len_min, cfg.word_len_max + 1))
    return "".join(string.ascii_lowercase[i] for i in rng.integers(0, 26, n))


def _choice(rng: np.random.Generator, items: tuple[str, ...] | list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _state(rng: np.random.Generator, vocab: Vocabulary, defect: str | None, location: str | None,
           cfg: CaptionConfig) -> str:
    """A state phrase with one '{}' for the noun phrase."""
    if defect is None:
        return _choice(rng, vocab.normal_states) if rng.uniform() < 0.75 else _choice(rng, EXTRA_NORMAL)
    u = rng.uniform()
    if u < 0.35:
        return _choice(rng, vocab.anomalous_states)
    if u < 0.5:
        return _choice(rng, EXTRA_ANOMALOUS)
    if u < 0.72:
        return _choice(rng, DEFECT_ADJECTIVES[defect]) + " {}"
    phrase = "{} with a " + _choice(rng, DEFECT_NOUNS[defect])
    if location and rng.uniform() < cfg.location_prob:
        phrase += " " + _choice(rng, LOCATION_PHRASES).format(location)
    return phrase


def caption(
    rng: np.random.Generator,
    kind: str,
    colour: str | None,
    defect: str | None,
    location: str | None = None,
    closeup: bool = False,
    cfg: CaptionConfig = CaptionConfig(),
    vocabulary: str | None = None,
) -> str:
    """One caption for an image of `kind` (and `colour`), normal when `defect` is None.

    Random strings, when drawn, go in one of five places: replacing the noun (the paper's object slot), before
    the noun, after it, before the whole caption or after it. They are drawn independently of the state.
    """
    vocab = _vocab(vocabulary)
    noun = _choice(rng, GENERIC_NOUNS) if rng.uniform() < cfg.generic_prob else _choice(rng, KIND_NOUNS[kind])
    if colour and rng.uniform() < cfg.colour_prob:
        noun = f"{_choice(rng, COLOUR_WORDS.get(colour, (colour,)))} {noun}"
    words = ""
    place = -1
    if rng.uniform() < cfg.random_word_prob:
        n = int(rng.integers(cfg.words_min, cfg.words_max + 1))
        words = " ".join(random_string(rng, cfg) for _ in range(n))
        place = int(rng.integers(5))
        if place == 0:
            noun = words
        elif place == 1:
            noun = f"{words} {noun}"
        elif place == 2:
            noun = f"{noun} {words}"
    phrase = _state(rng, vocab, defect, location, cfg).format(noun)
    if closeup:
        template = _choice(rng, CLOSEUP_TEMPLATES)
    else:
        plain = [t for t in vocab.templates if "close-up" not in t and "cropped" not in t]
        template = _choice(rng, plain + list(EXTRA_TEMPLATES)) if rng.uniform() < 0.9 else _choice(rng, vocab.templates)
    text = template.format(phrase)
    if place == 3:
        text = f"{words} {text}"
    elif place == 4:
        text = f"{text} {words}"
    return text
