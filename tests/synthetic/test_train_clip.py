"""The tiny-CLIP trainer: the loss falls, resume continues the same run, the published CLIP loads back unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from service.clip_backend import ClipSpec, load_clip
from service.store import ModelStore
from service.synthetic.train_clip import TrainClipConfig, lr_at, model_config, preprocess, publish, train


def _cfg(**kw) -> TrainClipConfig:
    base = dict(steps=10, batch=16, lr=2e-3, warmup=2, seed=0, render_size=32, image_size=64, embed_dim=32,
                vision_width=8, text_width=32, text_layers=1, text_heads=2, context_length=64, device="cpu",
                workers=0, log_every=5, ckpt_every=1000, centre_images=16, centre_captions=16)
    base.update(kw)
    return TrainClipConfig(**base)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return train(_cfg(), progress=False, log=lambda _: None)


def test_loss_falls_over_a_few_steps(trained):
    assert trained.steps_done == 10 and len(trained.losses) == 10
    assert np.mean(trained.losses[-3:]) < np.mean(trained.losses[:2]) - 0.1


def test_schedule_warms_up_then_decays_to_zero():
    assert lr_at(0, 1.0, 4, 100) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 100) == pytest.approx(1.0)
    assert lr_at(52, 1.0, 4, 100) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 4, 100) == pytest.approx(0.0)


def test_resume_continues_the_same_run(tmp_path, trained):
    ckpt = tmp_path / "ckpt.pt"
    first = train(_cfg(), ckpt_path=ckpt, progress=False, log=lambda _: None, stop_after=4)
    assert first.steps_done == 4
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    resumed = train(_cfg(), ckpt_path=ckpt, resume=ckpt, progress=False, log=lambda _: None)
    assert resumed.steps_done == 10
    assert resumed.losses == pytest.approx(trained.losses[4:], abs=1e-4)
    for (name, a), b in zip(resumed.model.state_dict().items(), trained.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_resume_refuses_another_model(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    train(_cfg(steps=2), ckpt_path=ckpt, progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="another model config"):
        train(_cfg(steps=2, embed_dim=16), resume=ckpt, progress=False, log=lambda _: None)


def test_published_clip_loads_back_with_the_same_embeddings(tmp_path, trained):
    cfg = _cfg()
    version = publish(trained, cfg, tmp_path, device="cpu", log=lambda _: None)
    store = ModelStore(tmp_path)
    assert store.current(cfg.out_name) == version
    manifest = store.manifest(cfg.out_name, version)
    assert manifest["training"]["steps_done"] == 10 and manifest["training"]["device"].startswith("cpu")
    assert "No test data" in manifest["centers"]["reference"]
    assert manifest["tokenizer"]["type"] == "char"

    backend = load_clip(ClipSpec("store", name=cfg.out_name, version=version), tmp_path, device="cpu", precision="fp32")
    assert backend.image_size == 64 and backend.image_center is not None and backend.text_center is not None

    # The store holds fp16 weights: the reference is the trained model rounded the same way.
    from open_clip.model import CLIP

    ref = CLIP(**model_config(cfg)).eval()
    ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in trained.model.state_dict().items()})
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    pixels = preprocess(images, 64)
    texts = ["a photo of a flawless qzvk part.", "a photo of a damaged gear.", "a cropped photo of the wood."]
    with torch.no_grad():
        want_img = backend.finish_image(ref.encode_image(pixels))
        want_txt = backend.finish_text(ref.encode_text(backend.tokenizer(texts)))
    # The loader folds BatchNorms into the convolutions (another rounding than conv then BN): up to 2.3e-5 on an
    # AVX-512 CPU, on embeddings up to 0.4.
    assert torch.allclose(backend.encode_image(pixels), want_img, atol=1e-4)
    assert torch.allclose(backend.encode_text(texts), want_txt, atol=1e-4)
    # The centres are the means the manifest names: the centred reference images are not all alike.
    assert backend.encode_image(pixels).std(0).mean() > 0


def test_init_from_a_published_clip_starts_from_its_weights(tmp_path, trained):
    cfg = _cfg()
    version = publish(trained, cfg, tmp_path, device="cpu", log=lambda _: None)
    published = load_clip(ClipSpec("store", name=cfg.out_name, version=version), tmp_path, device="cpu",
                          precision="fp32", fold_bn=False).model.state_dict()  # the file's own tensors
    # A negligible lr: the parameters must end where the published (fp16) ones start, and not without init_from.
    init = train(_cfg(steps=2, lr=1e-12), progress=False, log=lambda _: None, init_from=(tmp_path, cfg.out_name, version))
    fresh = train(_cfg(steps=2, lr=1e-12), progress=False, log=lambda _: None)
    for name, value in init.model.named_parameters():
        assert torch.allclose(value, published[name], atol=1e-6), name
    assert not torch.allclose(dict(fresh.model.named_parameters())["text_projection"], published["text_projection"])
    # The continued model's manifest names what it started from.
    later = publish(init, _cfg(), tmp_path, device="cpu", log=lambda _: None, init_from=f"{cfg.out_name}@{version}")
    assert later != version
    assert ModelStore(tmp_path).manifest(cfg.out_name, later)["training"]["init_from"] == f"{cfg.out_name}@{version}"
    with pytest.raises(ValueError, match="another model config"):
        train(_cfg(steps=1, embed_dim=16), progress=False, log=lambda _: None, init_from=(tmp_path, cfg.out_name, version))


def _drift(model: torch.nn.Module, start: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean 1 - cos between two models' image embeddings of the same images (eval mode)."""
    with torch.no_grad():
        a = torch.nn.functional.normalize(model.eval().encode_image(images), dim=-1)
        b = torch.nn.functional.normalize(start.eval().encode_image(images), dim=-1)
    return float((1 - (a * b).sum(-1)).mean())


def test_distillation_keeps_a_fine_tune_close_to_its_start(tmp_path, trained):
    from service.synthetic.train_clip import build_model, distill_loss

    cfg = _cfg()
    version = publish(trained, cfg, tmp_path, device="cpu", log=lambda _: None)
    init = (tmp_path, cfg.out_name, version)
    start = load_clip(ClipSpec("store", name=cfg.out_name, version=version), tmp_path, device="cpu",
                      precision="fp32", fold_bn=False).model
    # The term is zero for the model itself and positive for another one.
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(1, 30, (4, 64))
    same = build_model(cfg)
    same.load_state_dict(start.state_dict())
    named = torch.tensor([True, False, True, False])
    with torch.no_grad():
        img = torch.nn.functional.normalize(same.train().encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(same.encode_text(tokens), dim=-1)
    assert float(distill_loss(img, txt, same, images, tokens, named)) < 1e-5
    other = build_model(_cfg(seed=1))
    assert float(distill_loss(img, txt, other.train(), images, tokens, named)) > 0.01
    # A fine-tune with the term drifts less from where it started than the same fine-tune without it.
    kw = dict(steps=6, lr=5e-3, warmup=1, seed=3, random_kind_prob=0.5)
    plain = train(_cfg(**kw), progress=False, log=lambda _: None, init_from=init)
    held = train(_cfg(**kw, distill_weight=20.0), progress=False, log=lambda _: None, init_from=init)
    probe = preprocess(torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8), 64)
    assert _drift(held.model, start, probe) < 0.5 * _drift(plain.model, start, probe)
    with pytest.raises(ValueError, match="needs --init-from"):
        train(_cfg(steps=1, distill_weight=1.0), progress=False, log=lambda _: None)
