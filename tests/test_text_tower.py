"""Weights in the serving precision only, the text tower released after the anchors, and the anchor cache (#17).

The anchors of an object word come from the text tower once; afterwards from a verified file next to the model, so a
restarted service never loads the tower, and `ZSAD_TEXT_TOWER=off` refuses words it has no anchors for.
"""
from __future__ import annotations

import dataclasses
import json
import stat

import pytest
import torch

from service.anchor_cache import AnchorCache
from service.clip_backend import ClipBackend, is_text_key, load_clip
from service.detector import ModelLoadError, TextTowerOff, load_detector
from service.prompts import Vocabulary
from service.settings import Settings
from tests.conftest import publish_tiny_model


# --- weights dtype after load ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tower", ["rn", "vit"])
def test_bf16_load_holds_only_bf16_weights_equal_to_the_cast_fp32_ones(tiny_store, tower):
    root, specs = tiny_store
    full = load_clip(specs[tower], root, device="cpu", precision="fp32")
    lean = load_clip(specs[tower], root, device="cpu", precision="bf16", text_tower=False)
    ref = full.model.state_dict()
    for name, t in lean.model.state_dict().items():
        if is_text_key(name):
            assert t.is_meta, f"{name}: the text tower must not be loaded"
            continue
        assert not t.is_meta, name
        if ref[name].is_floating_point():
            assert t.dtype == torch.bfloat16, f"{name} is {t.dtype}: no fp32 master copy in bf16 mode"
            assert torch.equal(t, ref[name].to(torch.bfloat16)), name
        else:
            assert torch.equal(t, ref[name]), name
    assert all(p.dtype == torch.float32 for p in full.model.parameters())
    assert full.text_loaded and not lean.text_loaded


def test_text_tower_loads_on_demand_in_the_serving_precision_and_releases(tiny_store):
    root, specs = tiny_store
    full = load_clip(specs["vit"], root, device="cpu", precision="fp32")
    lean = load_clip(specs["vit"], root, device="cpu", precision="fp32", text_tower=False)
    prompts = ["a photo of a flawless widget.", "a photo of a damaged widget."]
    torch.testing.assert_close(lean.encode_text(prompts), full.encode_text(prompts), rtol=0, atol=0)
    assert lean.text_loaded
    lean.release_text()
    assert not lean.text_loaded
    text = [t for n, t in lean.model.named_parameters() if is_text_key(n)]
    assert text and all(t.is_meta for t in text)
    lean.load_text()
    assert all(t.dtype == torch.float32 and not t.is_meta for n, t in lean.model.named_parameters() if is_text_key(n))
    assert lean.model.attn_mask is not None and not lean.model.attn_mask.is_meta
    torch.testing.assert_close(lean.model.attn_mask, full.model.attn_mask, rtol=0, atol=0)


# --- anchor cache and ZSAD_TEXT_TOWER ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("anchor-store")
    publish_tiny_model(root)
    return root


@pytest.fixture
def fresh_root(model_root, tmp_path):
    """The module's store with no anchor files yet (each test starts cold)."""
    import shutil

    root = tmp_path / "store"
    shutil.copytree(model_root, root)
    shutil.rmtree(root / "default" / ".anchors", ignore_errors=True)
    return root


@pytest.fixture
def text_loads(monkeypatch):
    """Counts how often a text tower is loaded from its weights file."""
    calls = []
    real = ClipBackend.load_text

    def counting(self):
        if not self.text_loaded:
            calls.append(1)
        real(self)

    monkeypatch.setattr(ClipBackend, "load_text", counting)
    return calls


def _settings(root, mode="release") -> Settings:
    return Settings(model_store=root, device="cpu", precision="fp32", text_tower=mode)


def test_anchors_computed_once_then_served_from_the_cache_without_a_text_tower(fresh_root, text_loads):
    first = load_detector(_settings(fresh_root))
    assert len(text_loads) == 1 and not first.backend.text_loaded  # released after the generic word's anchors
    files = list((fresh_root / "default" / ".anchors").rglob("*.safetensors"))
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700

    second = load_detector(_settings(fresh_root))  # a restart
    assert len(text_loads) == 1 and not second.backend.text_loaded  # the cache hit needed no text tower
    torch.testing.assert_close(second.anchors().normal, first.anchors().normal, rtol=0, atol=0)
    torch.testing.assert_close(second.anchors().anomalous, first.anchors().anomalous, rtol=0, atol=0)


def test_cached_anchors_equal_the_text_towers(fresh_root):
    load_detector(_settings(fresh_root))
    cached = load_detector(_settings(fresh_root)).anchors("gear")  # computed: new word
    kept = load_detector(_settings(fresh_root, "keep"))
    assert kept.backend.text_loaded
    again = load_detector(_settings(fresh_root)).anchors("gear")  # from the file
    torch.testing.assert_close(again.normal, cached.normal, rtol=0, atol=0)
    normal, _ = __import__("service.prompts", fromlist=["ensemble"]).ensemble(kept.vocab, "gear")
    direct = kept.backend.encode_text(normal).mean(0)
    torch.testing.assert_close(again.normal, torch.nn.functional.normalize(direct, dim=-1), rtol=1e-6, atol=1e-6)


def test_a_new_object_word_or_vocabulary_misses_the_cache(fresh_root, text_loads):
    det = load_detector(_settings(fresh_root))
    assert len(text_loads) == 1
    det.anchors("gear")
    assert len(text_loads) == 2 and not det.backend.text_loaded  # reloaded for the new word, released again
    vocab = det.vocab
    other = Vocabulary(**{**{f.name: getattr(vocab, f.name) for f in dataclasses.fields(vocab)},
                          "normal_states": (*vocab.normal_states, "pristine {}")})
    det2 = dataclasses.replace(load_detector(_settings(fresh_root)), vocab=other, _anchors={})
    assert len(text_loads) == 2  # the restart hit the cache
    det2.anchors()
    assert len(text_loads) == 3  # same word, other prompts: recomputed
    assert len(list((fresh_root / "default" / ".anchors").rglob("*.safetensors"))) == 3


def test_a_tampered_anchor_file_is_recomputed_not_used(fresh_root, text_loads):
    first = load_detector(_settings(fresh_root)).anchors()
    path = next((fresh_root / "default" / ".anchors").rglob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # last float of the tensors -> inf: the stored checksum no longer matches
    path.write_bytes(bytes(data))
    again = load_detector(_settings(fresh_root)).anchors()
    assert len(text_loads) == 2
    torch.testing.assert_close(again.normal, first.normal, rtol=0, atol=0)


def test_a_file_holding_another_key_is_not_used(fresh_root, text_loads):
    det = load_detector(_settings(fresh_root))
    cache = det.anchor_cache
    assert isinstance(cache, AnchorCache)
    path = next(cache.folder.glob("*.safetensors"))
    key = json.loads(json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
                     ["__metadata__"]["key"])
    other = {**key, "word": "gear"}
    path.rename(cache.path(other))  # a file under gear's name whose content is for another word
    det.anchors("gear")
    assert len(text_loads) == 2


def test_text_tower_off_refuses_uncached_words_clearly(fresh_root, text_loads):
    with pytest.raises(ModelLoadError, match="ZSAD_TEXT_TOWER=off"):
        load_detector(_settings(fresh_root, "off"))  # nothing cached yet: not even the generic word
    assert not text_loads
    load_detector(_settings(fresh_root))  # caches the generic word
    det = load_detector(_settings(fresh_root, "off"))
    assert not det.backend.text_loaded
    with pytest.raises(TextTowerOff, match="'gear'.*ZSAD_TEXT_TOWER=off"):
        det.anchors("gear")
    assert len(text_loads) == 1


def test_text_tower_off_answers_an_uncached_word_with_a_clear_422(fresh_root, tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from tests.api.helpers import image_bytes, make_settings, wait_ready

    load_detector(_settings(fresh_root))  # caches the generic word's anchors, as `zsad anchors` would
    app = create_app(make_settings(tmp_path, fresh_root, text_tower="off"))
    with TestClient(app) as c:
        wait_ready(c)
        png = {"content-type": "image/png"}
        assert c.post("/v1/detect", content=image_bytes(), headers=png).status_code == 200
        r = c.post("/v1/detect", content=image_bytes(), headers=png, params={"object": "gear"})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "object_word_unavailable" and "ZSAD_TEXT_TOWER=off" in r.text
        assert c.post("/v1/detect", content=image_bytes(), headers=png).status_code == 200  # the service goes on
