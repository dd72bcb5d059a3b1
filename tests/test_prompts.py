import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.prompts import RandomWordConfig, Vocabulary, clean_pairs, ensemble, random_word_pairs
from service.tokenizer import CharTokenizer

VOCAB = Vocabulary.load()


def test_default_vocabulary_is_winclip():
    assert len(VOCAB.normal_states) == 7 and len(VOCAB.anomalous_states) == 4
    assert len(VOCAB.templates) >= 20
    assert "flawless {}" in VOCAB.normal_states and "damaged {}" in VOCAB.anomalous_states


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    words=st.tuples(st.integers(1, 4), st.integers(0, 3)),
    lens=st.tuples(st.integers(1, 6), st.integers(0, 8)),
)
def test_pairs_differ_only_in_state_phrase(seed, words, lens):
    cfg = RandomWordConfig(n_pairs=20, words_min=words[0], words_max=words[0] + words[1],
                           word_len_min=lens[0], word_len_max=lens[0] + lens[1], seed=seed)
    for pair in random_word_pairs(VOCAB, cfg):
        # Both prompts are the shared template around a state phrase around the shared words.
        assert pair.template in VOCAB.templates
        assert any(pair.normal == pair.template.format(n.format(pair.words)) for n in VOCAB.normal_states)
        assert any(pair.anomalous == pair.template.format(a.format(pair.words)) for a in VOCAB.anomalous_states)
        assert pair.normal != pair.anomalous
        words_n = pair.words
        tokens = words_n.split()
        assert cfg.words_min <= len(tokens) <= cfg.words_max
        assert all(cfg.word_len_min <= len(w) <= cfg.word_len_max and w.isalpha() and w.islower() for w in tokens)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_same_seed_same_pairs_and_inside_token_limit(seed):
    cfg = RandomWordConfig(n_pairs=50, words_max=3, word_len_max=10, seed=seed)
    a, b = random_word_pairs(VOCAB, cfg), random_word_pairs(VOCAB, cfg)
    assert a == b
    assert random_word_pairs(VOCAB, RandomWordConfig(n_pairs=50, seed=seed + 1)) != a
    char = CharTokenizer(96)
    for pair in a:
        for prompt in (pair.normal, pair.anomalous):
            assert len(char.encode(prompt)) <= 96  # start + chars + end fit, nothing truncated


def test_bpe_token_limit_for_longest_default_prompts():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-16-plus-240")
    cfg = RandomWordConfig(n_pairs=300, words_min=3, words_max=3, word_len_min=10, word_len_max=10, seed=1)
    prompts = [p.anomalous for p in random_word_pairs(VOCAB, cfg)] + [p.normal for p in random_word_pairs(VOCAB, cfg)]
    ids = tok(prompts)
    assert (ids[:, -1] == 0).all(), "a prompt filled the 77-token context and was truncated"


def test_clean_pairs_and_ensemble_use_object_word():
    pairs = clean_pairs(VOCAB, "object")
    assert len(pairs) == len(VOCAB.templates) * 7 * 4
    normal, anomalous = ensemble(VOCAB, "screw")
    assert len(normal) == len(VOCAB.templates) * 7 and all("screw" in p for p in normal + anomalous)


def test_vocabulary_file_is_validated(tmp_path):
    bad = tmp_path / "v.json"
    bad.write_text(json.dumps({"normal_states": ["ok {}"], "anomalous_states": ["no slot"], "templates": ["{}"]}))
    with pytest.raises(ValueError, match="exactly one"):
        Vocabulary.load(bad)
    with pytest.raises(ValueError, match="cannot read"):
        Vocabulary.load(tmp_path / "missing.json")


def test_bad_random_word_config():
    with pytest.raises(ValueError):
        RandomWordConfig(words_min=3, words_max=2)


def test_fixed_object_ablation_keeps_the_template_and_state_sampling():
    cfg = RandomWordConfig(n_pairs=30, seed=5)
    plain = random_word_pairs(VOCAB, cfg, fixed_object="object")
    randomised = random_word_pairs(VOCAB, cfg)
    assert all(p.words == "object" for p in plain)
    # Same rng stream for templates and states: only the object slot differs.
    assert [p.template for p in plain[:1]] == [r.template for r in randomised[:1]]
    assert plain[0].normal == randomised[0].normal.replace(randomised[0].words, "object")
