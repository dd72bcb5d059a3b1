import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from service.clip_backend import ClipLoadError, ClipSpec, load_clip, resolve_dtype
from service.store import ModelStore
from tests.conftest import publish_tiny_clip, tiny_cfg


def test_store_clip_round_trip_gives_the_saved_model(tmp_path):
    spec = publish_tiny_clip(tmp_path, "c", seed=5)
    torch.manual_seed(5)
    reference = open_clip.model.CLIP(**tiny_cfg()).eval()
    backend = load_clip(spec, tmp_path, device="cpu")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(x), dim=-1)
    assert torch.allclose(backend.encode_image(x), expected, atol=1e-5)
    assert backend.embed_dim == 32 and backend.image_size == 64 and backend.dtype == torch.float32


def test_fp16_store_weights_load_into_fp32_model(tmp_path):
    spec = publish_tiny_clip(tmp_path, "c16", fp16=True)
    backend = load_clip(spec, tmp_path, device="cpu")
    assert next(backend.model.parameters()).dtype == torch.float32


def test_missing_pretrained_weights_name_the_fetch_command(tmp_path):
    spec = ClipSpec("pretrained", "ViT-B-16-plus-240", pretrained="laion400m_e31")
    with pytest.raises(ClipLoadError, match="zsad fetch-weights --model ViT-B-16-plus-240 --pretrained laion400m_e31"):
        load_clip(spec, tmp_path, device="cpu")


def test_unknown_architecture_and_tag_are_clear_errors(tmp_path):
    with pytest.raises(ClipLoadError, match="unknown open_clip architecture"):
        load_clip(ClipSpec("pretrained", "ViT-Nope", pretrained="x"), tmp_path, device="cpu")
    with pytest.raises(ClipLoadError, match="unknown pretrained tag"):
        load_clip(ClipSpec("pretrained", "ViT-B-16-plus-240", pretrained="nope"), tmp_path, device="cpu")


def test_local_file_source_checks_sha_and_never_loads_random(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = open_clip.model.CLIP(**cfg)
    # A local file for an in-house config: register the config under a name so open_clip knows it.
    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "zsad-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_dir)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    from service.store import sha256_file

    ok = ClipSpec("file", "zsad-tiny-test", path=str(weights), sha256=sha256_file(weights))
    backend = load_clip(ok, tmp_path, device="cpu")
    assert torch.equal(backend.model.visual.attnpool.c_proj.weight, model.visual.attnpool.c_proj.weight)
    with pytest.raises(ClipLoadError, match="checksum mismatch"):
        load_clip(ClipSpec("file", "zsad-tiny-test", path=str(weights), sha256="0" * 64), tmp_path, device="cpu")
    with pytest.raises(ClipLoadError, match="does not exist"):
        load_clip(ClipSpec("file", "zsad-tiny-test", path=str(tmp_path / "none.safetensors")), tmp_path, device="cpu")
    # Weights with a tensor missing: refused (strict), not half-random.
    partial = tmp_path / "partial.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "attnpool" not in k}
    save_file(state, str(partial))
    with pytest.raises(ClipLoadError, match="cannot load CLIP weights"):
        load_clip(ClipSpec("file", "zsad-tiny-test", path=str(partial)), tmp_path, device="cpu")


def test_corrupt_store_clip_is_refused(tmp_path):
    spec = publish_tiny_clip(tmp_path, "c")
    weights = tmp_path / "c" / spec.version / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ClipLoadError, match="checksum mismatch"):
        load_clip(spec, tmp_path, device="cpu")


def test_store_clip_sha_must_match_the_manifest_reference(tmp_path):
    spec = publish_tiny_clip(tmp_path, "c")
    wrong = ClipSpec("store", name="c", version=spec.version, sha256="f" * 64)
    with pytest.raises(ClipLoadError, match="not the CLIP this model was trained on"):
        load_clip(wrong, tmp_path, device="cpu")


def test_centres_are_applied_to_both_modalities(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = open_clip.model.CLIP(**cfg).eval()
    from service.clip_backend import save_store_clip

    centers = {"image": torch.full((32,), 0.1), "text": torch.full((32,), -0.1)}
    store = ModelStore(tmp_path)
    v = save_store_clip(store, "cc", model, cfg, {"type": "char", "context_length": 64}, centers=centers,
                        centers_reference="unit test", fp16=False)
    backend = load_clip(ClipSpec("store", name="cc", version=v), tmp_path, device="cpu")
    raw = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    expected = torch.nn.functional.normalize(raw - 0.1, dim=-1)
    assert torch.allclose(backend.finish_image(raw), expected, atol=1e-6)
    assert backend.info["centers_reference"] == "unit test"


def test_precision_policy(monkeypatch):
    import service.clip_backend as cb

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32  # tests run with fast bf16 switched off
    monkeypatch.setattr(cb, "cpu_bf16_is_fast", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_bf16_is_fast_only_with_amx():
    """AVX512-BF16 without AMX measured slower in bf16 than fp32 (fast_transformer.bf16_is_fast): auto keeps fp32."""
    from service.fast_transformer import bf16_is_fast

    assert not bf16_is_fast("flags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_fp16")
    assert bf16_is_fast("flags\t\t: fpu vme avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8")
    assert not bf16_is_fast("flags\t\t: fpu amx_bf16x")  # a whole flag, not a prefix
    assert not bf16_is_fast("")
