"""`zsad synth dataset` writes a valid MVTec-AD layout; `zsad synth ...` argument errors exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from service.synthetic.cli import main
from service.synthetic.world import DEFECTS


def test_dataset_command_writes_mvtec_layout(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["synth", "dataset", "--out", str(out), "--kinds", "pill,gear", "--seed", "4", "--n-train", "2",
               "--n-good", "3", "--n-defect", "2", "--size", "40"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2 * (2 + 3 + 2 * len(DEFECTS))
    for kind in ("pill", "gear"):
        root = out / kind
        assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png"]
        assert len(list((root / "test" / "good").glob("*.png"))) == 3
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *DEFECTS])
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(DEFECTS)  # no masks for good
        for defect in DEFECTS:
            for img_path in sorted((root / "test" / defect).glob("*.png")):
                img = np.asarray(Image.open(img_path))
                mask = np.asarray(Image.open(root / "ground_truth" / defect / f"{img_path.stem}_mask.png"))
                assert img.shape == (40, 40, 3) and img.dtype == np.uint8
                assert mask.shape == (40, 40)
                assert set(np.unique(mask)) == {0, 255}
    manifest = json.loads((out / "synth_manifest.json").read_text())
    assert manifest["held_out_kinds"] == ["pill"] and manifest["spec"]["seed"] == 4


def test_dataset_is_reproducible_and_seed_dependent(tmp_path):
    args = ["--kinds", "wood", "--n-train", "1", "--n-good", "1", "--n-defect", "1", "--size", "32", "--defects", "hole"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert main(["synth", "dataset", "--out", str(tmp_path / name), "--seed", seed, *args]) == 0
    read = lambda n: np.asarray(Image.open(tmp_path / n / "wood" / "test" / "hole" / "000.png"))
    assert np.array_equal(read("a"), read("b"))
    assert not np.array_equal(read("a"), read("c"))


@pytest.mark.parametrize("argv", [
    ["synth", "dataset", "--out", "{tmp}", "--kinds", "teapot"],
    ["synth", "dataset", "--out", "{tmp}", "--size", "4"],
    ["synth", "dataset", "--kinds", "gear"],  # --out missing
    ["synth", "dataset", "--out", "{tmp}", "--defects", "rust"],
    ["synth", "train-clip", "--batch", "7"],
    ["synth", "train-clip", "--image-size", "100"],
    ["synth", "train-clip", "--crop-prob", "7"],
    ["synth", "train-clip", "--random-kind-prob", "1.5"],
    ["synth", "train-clip", "--kinds", "gear", "pill"],  # pill is held out
    ["synth", "train-clip", "--kinds", "teapot"],
    ["synth", "train-clip", "--init-from", "no-such-clip@v9", "--steps", "1", "--no-publish"],
    ["synth", "train-clip", "--resume", "/nonexistent/ckpt.pt"],
    ["synth", "train-clip", "--distill-weight", "1", "--steps", "1", "--no-publish"],  # no --init-from
    ["synth", "train-clip", "--distill-weight", "-1"],
    ["synth"],
])
def test_argument_errors_exit_2_with_a_message(argv, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path / "x")) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_existing_kind_folder_is_not_overwritten_silently(tmp_path, capsys):
    args = ["synth", "dataset", "--out", str(tmp_path), "--kinds", "screw", "--n-train", "1", "--n-good", "0",
            "--n-defect", "0", "--size", "24"]
    assert main(args) == 0
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


@pytest.mark.parametrize("argv", [["synth", "--help"], ["synth", "dataset", "--help"], ["synth", "train-clip", "--help"]])
def test_each_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_clip_trains_on_the_kinds_it_is_given(tmp_path, capsys):
    """--kinds narrows the training kinds (a seen kind left out can serve as a validation kind)."""
    argv = ["synth", "train-clip", "--kinds", "gear,wood", "--steps", "1", "--batch", "4", "--workers", "0",
            "--image-size", "64", "--render-size", "32", "--device", "cpu", "--no-publish", "--quiet",
            "--ckpt", str(tmp_path / "ckpt.pt"), "--store", str(tmp_path / "store")]
    assert main(argv) == 0
    assert "kinds gear, wood (+ random kinds 0)" in capsys.readouterr().err


@pytest.mark.parametrize(("version", "message"), [("v3", "already exists"), ("bad/v", "invalid model version")])
def test_train_clip_refuses_a_taken_or_bad_version_before_any_work(version, message, tmp_path, capsys):
    taken = tmp_path / "store" / "tiny-factory-clip" / "v3"  # a taken version: versions are immutable
    taken.mkdir(parents=True)
    (taken / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["--store", str(tmp_path / "store"), "synth", "train-clip", "--version", version, "--steps", "1",
              "--ckpt", str(tmp_path / "ckpt.pt"), "--workers", "0"])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "ckpt.pt").exists()  # refused before any training
