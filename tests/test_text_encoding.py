import open_clip
import pytest
import torch

from service.prompts import RandomWordConfig, Vocabulary, random_word_pairs
from service.text_encoding import encode_prompts, encode_tokens


def prompts(n=64, seed=0):
    pairs = random_word_pairs(Vocabulary.load(), RandomWordConfig(n_pairs=n // 2, seed=seed))
    return [p.normal for p in pairs] + [p.anomalous for p in pairs] + ["x", "a photo of a flawless object."]


def test_fast_path_equals_encode_text_on_tiny_model(tiny_backend):
    model, tok = tiny_backend.model, tiny_backend.tokenizer
    texts = prompts()
    with torch.no_grad():
        ref = model.encode_text(tok(texts))
    fast = encode_prompts(model, tok, texts, batch_size=16)
    assert (fast - ref).abs().max() < 1e-5


@pytest.mark.slow
def test_fast_path_equals_encode_text_on_vit_b16_plus_random_weights():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-plus-240", pretrained=None).eval()
    tok = open_clip.get_tokenizer("ViT-B-16-plus-240")
    texts = prompts(24)
    with torch.no_grad():
        ref = model.encode_text(tok(texts))
    fast = encode_prompts(model, tok, texts, batch_size=8)
    assert (fast - ref).abs().max() < 1e-5


def test_sequence_is_cut_to_the_longest_prompt(tiny_backend, monkeypatch):
    import service.text_encoding as te

    model, tok = tiny_backend.model, tiny_backend.tokenizer
    seen = []
    original = te.block_forward
    monkeypatch.setattr(te, "block_forward", lambda blk, x, shapes, **kw: seen.append(shapes) or original(blk, x, shapes, **kw))
    tokens = tok(["abc", "abcdef"])
    encode_tokens(model, tokens)
    assert seen and all(shapes == [(2, len("abcdef") + 2)] for shapes in seen)  # start + 6 chars + end


def test_empty_prompt_list_is_an_error(tiny_backend):
    with pytest.raises(ValueError):
        encode_prompts(tiny_backend.model, tiny_backend.tokenizer, [])
