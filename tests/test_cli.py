import json

import numpy as np
import pytest
from PIL import Image

from service.cli import main


def test_train_store_score_end_to_end(tiny_store, tmp_path, capsys):
    root, specs = tiny_store
    store = tmp_path / "store"
    import shutil

    shutil.copytree(root, store)
    rc = main(["--store", str(store), "train", "--clip", "tiny-clip", "--n-pairs", "150", "--epochs", "2",
               "--name", "cli-model", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["version"] == "v1" and 0.0 <= out["val_auroc_clean"] <= 1.0

    assert main(["store", "list", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "* cli-model@v1" in listing and "tiny-clip@v1" in listing

    good = tmp_path / "part.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    heat = tmp_path / "heat"
    rc = main(["--store", str(store), "score", str(good), str(bad), "--model-ref", "cli-model@v1",
               "--heatmap", str(heat)])
    lines = [json.loads(row) for row in capsys.readouterr().out.strip().splitlines()]
    assert rc == 1  # one unreadable file -> non-zero exit, but the other file was still scored
    assert lines[0]["path"] == str(good) and 0 <= lines[0]["s_fnn"] <= 1 and "regions" in lines[0]
    assert lines[1]["path"] == str(bad) and "error" in lines[1]
    assert Image.open(heat / "part_overlay.png").size == (60, 40)
    assert Image.open(heat / "part_mask.png").size == (60, 40)


def test_wrong_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--n-pairs", "many"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2


def test_model_flag_needs_a_weights_source(tmp_path, capsys):
    assert main(["--store", str(tmp_path), "train", "--model", "ViT-B-16-plus-240"]) == 1
    assert "exactly one of --pretrained" in capsys.readouterr().err


def test_missing_pretrained_weights_fail_cleanly(tmp_path, capsys):
    rc = main(["--store", str(tmp_path), "train", "--model", "ViT-B-16-plus-240", "--pretrained", "laion400m_e31"])
    assert rc == 1
    assert "zsad fetch-weights --model ViT-B-16-plus-240 --pretrained laion400m_e31" in capsys.readouterr().err


def test_fetch_weights_offline_fails_with_nonzero_exit(tmp_path, capsys, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    rc = main(["--store", str(tmp_path), "fetch-weights", "--model", "ViT-B-16-plus-240", "--pretrained", "laion400m_e31"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "offline" in err and "zsad fetch-weights" in err


def _store_and_normal_images(tiny_store, tmp_path, n: int, seed: int, low: int, high: int):
    """A writable copy of the tiny store, and a folder of `n` seeded 32x32 "normal" images."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store[0], store)
    normal = tmp_path / "normal"
    normal.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(low, high, (32, 32, 3), dtype=np.uint8)).save(normal / f"{i}.png")
    return store, normal


def test_train_records_a_score_calibration_from_normal_images(tiny_store, tmp_path, capsys):
    store, normal = _store_and_normal_images(tiny_store, tmp_path, 12, seed=1, low=80, high=120)
    assert main(["--store", str(store), "train", "--clip", "tiny-clip", "--n-pairs", "100", "--epochs", "1",
                 "--name", "cal", "--quiet", "--calibration-images", str(normal)]) == 0
    manifest = json.loads((store / "cal" / "v1" / "manifest.json").read_text())
    assert manifest["calibration"]["n_images"] == 12 and len(manifest["calibration"]["fnn"]) == 2
    assert set(manifest["threshold_advice"]) >= {"fnn", "prompt", "combined"}
    # The calibrated model puts most of its own normal reference images below 0.5.
    capsys.readouterr()
    assert main(["--store", str(store), "score", *map(str, sorted(normal.iterdir())), "--model-ref", "cal"]) == 0
    lines = [json.loads(row) for row in capsys.readouterr().out.strip().splitlines()]
    assert sum(line["s_fnn"] <= 0.5 for line in lines) >= 10 and sum(line["s_pr"] <= 0.5 for line in lines) >= 10
    assert main(["--store", str(store), "train", "--clip", "tiny-clip", "--name", "x", "--quiet",
                 "--calibration-images", str(tmp_path / "nowhere")]) == 1


def test_train_records_test_time_views_and_calibrates_with_them(tiny_store, tmp_path):
    import torch

    from service.detector import load_detector
    from service.preprocess import load_image, to_pixels
    from service.scoring import fnn_logit
    from service.settings import Settings
    from service.tta import encode_global

    store, normal = _store_and_normal_images(tiny_store, tmp_path, 10, seed=2, low=0, high=255)
    assert main(["--store", str(store), "train", "--clip", "tiny-clip", "--n-pairs", "100", "--epochs", "1",
                 "--name", "tta", "--quiet", "--tta-views", "8", "--calibration-images", str(normal)]) == 0
    manifest = json.loads((store / "tta" / "v1" / "manifest.json").read_text())
    assert manifest["tta"] == {"views": 8}
    det = load_detector(Settings(model_store=store, model_name="tta", device="cpu"))
    assert det.tta_views == 8
    # The calibration offset is the 0.99 quantile of the logits of the *averaged* embeddings, as the service makes them.
    b = det.backend
    pixels, _ = to_pixels([load_image(p) for p in sorted(normal.iterdir())], b.image_size, b.mean, b.std)
    logits = {n: fnn_logit(encode_global(b, pixels, n), det.fnn) for n in (1, 8)}
    offset = manifest["calibration"]["fnn"][0]
    q = {n: float(torch.quantile(v.double(), 0.99)) for n, v in logits.items()}
    assert abs(offset - q[8]) < 1e-7 < abs(offset - q[1])  # (an untrained tiny CLIP: the logits differ little)
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses a view count that is not a group
        main(["--store", str(store), "train", "--clip", "tiny-clip", "--name", "y", "--tta-views", "3"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "factory-gw.example"])
def test_serve_refuses_an_open_api_on_a_non_loopback_address(host, monkeypatch, capsys):
    import uvicorn

    for var in ("ZSAD_API_KEYS_READ", "ZSAD_API_KEYS_ADMIN", "ZSAD_ALLOW_OPEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ZSAD_MODEL_STORE", "model_store")  # cmd_serve sets it for the server: restored after
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append(k))
    assert main(["serve", "--host", host]) == 1 and not calls
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-open" in err and "ZSAD_ALLOW_OPEN=1" in err
    assert "ZSAD_API_KEYS_READ" in err

    assert main(["serve", "--host", host, "--allow-open"]) == 0 and calls[-1]["host"] == host
    monkeypatch.setenv("ZSAD_ALLOW_OPEN", "1")
    assert main(["serve", "--host", host]) == 0
    monkeypatch.delenv("ZSAD_ALLOW_OPEN")
    monkeypatch.setenv("ZSAD_API_KEYS_ADMIN", '["k"]')
    assert main(["serve", "--host", host]) == 0 and len(calls) == 3


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "localhost"])
def test_serve_on_loopback_needs_no_keys(host, monkeypatch):
    import uvicorn

    for var in ("ZSAD_API_KEYS_READ", "ZSAD_API_KEYS_ADMIN", "ZSAD_ALLOW_OPEN", "ZSAD_HOST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ZSAD_MODEL_STORE", "model_store")
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: calls.append(k))
    assert main(["serve", "--host", host]) == 0 and calls[0]["host"] == host
    assert main(["serve"]) == 0 and calls[1]["host"] == "127.0.0.1"  # the default binds loopback


def test_db_upgrade_and_status(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZSAD_RESULTS_PATH", str(tmp_path / "r.sqlite"))
    monkeypatch.delenv("ZSAD_RESULTS_URL", raising=False)
    assert main(["db", "status"]) == 1  # a fresh database is behind
    assert json.loads(capsys.readouterr().out)["current"] is None
    assert main(["db", "upgrade"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["before"] is None and out["after"] == out["head"] and "r.sqlite" in out["database"]
    assert main(["db", "upgrade"]) == 0 and main(["db", "status"]) == 0  # idempotent, then at head
    capsys.readouterr()
    assert main(["db", "upgrade", "--url", "bogus://x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zsad db: error: cannot use database URL") and len(err.strip().splitlines()) == 1
