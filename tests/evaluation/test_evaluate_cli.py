"""`zsad evaluate` end to end on a small MVTec-layout set written here, with a tiny model in a temporary store."""
import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from service.cli import main
from service.clip_backend import load_clip
from service.detector import Detector, load_detector
from service.fnn import FNNConfig
from service.preprocess import load_image
from service.prompts import RandomWordConfig
from service.settings import Settings
from service.store import ModelStore
from service.train import TrainConfig, train_fnn_model
from tests.conftest import publish_tiny_clip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    store = tmp / "store"
    backend = load_clip(publish_tiny_clip(store, "tiny-clip"), store, device="cpu")
    for seed in (0, 1):
        cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=100, seed=seed), fnn=FNNConfig(max_epochs=2, seed=seed))
        train_fnn_model(backend, cfg, ModelStore(store), "default")
    data = tmp / "data" / "widget"
    rng = np.random.default_rng(0)
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (data / folder).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(90, 110, (48, 64, 3), dtype=np.uint8)).save(data / f"test/good/{i:03d}.png")
        img = rng.integers(90, 110, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        mask[10:20, 30:44] = 255
        img[mask > 0] = 250
        Image.fromarray(img).save(data / f"test/scratch/{i:03d}.png")
        Image.fromarray(mask).save(data / f"ground_truth/scratch/{i:03d}_mask.png")
    return store, tmp / "data"


def run(env, out, *extra):
    store, data = env
    return main(["--store", str(store), "evaluate", str(data), "--out", str(out), "--quiet",
                 "--cache", str(out.parent / "cache"), *extra])


def test_outputs_equal_a_direct_computation(env, tmp_path, capsys):
    assert run(env, tmp_path / "out", "--worst", "2") == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"s_pr", "s_fnn", "combined"}
    keys = {"image_auroc", "image_aupr", "image_f1max", "pixel_auroc", "pixel_aupr", "pixel_f1max", "pro"}
    assert keys <= set(metrics["combined"]["widget"]) and keys <= set(metrics["combined"]["mean"])
    assert (out / "report.md").read_text().count("widget") >= 1
    assert list((out / "curves").rglob("*.png")) and len(list((out / "worst").glob("*.png"))) == 2

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 8
    # scores.csv equals the detector run directly, and metrics.json equals sklearn on scores.csv.
    store, _ = env
    det = load_detector(Settings(model_store=store, device="cpu"))
    for row in rows[:3]:
        direct = det.detect([load_image(row["path"])], heatmap=False)[0].scores
        assert float(row["s_fnn"]) == pytest.approx(direct["fnn"], abs=1e-5)
        assert float(row["s_pr"]) == pytest.approx(direct["prompt"], abs=1e-5)
    labels = [int(r["label"]) for r in rows]
    for v in ("s_pr", "s_fnn", "combined"):
        expected = roc_auc_score(labels, [float(r[v]) for r in rows])
        assert metrics[v]["widget"]["image_auroc"] == pytest.approx(expected, abs=1e-9)


def test_cache_is_hit_on_second_run_and_invalidated_by_a_model_change(env, tmp_path, monkeypatch, capsys):
    calls = []
    original = Detector.embed

    def counting(self, images, heatmap=True, timings=None):
        calls.append(len(images))
        return original(self, images, heatmap, timings)

    monkeypatch.setattr(Detector, "embed", counting)
    assert run(env, tmp_path / "a") == 0
    assert sum(calls) == 8
    calls.clear()
    assert run(env, tmp_path / "b", "--versions", "v1,v2") == 0  # rescoring two FNN versions: no CLIP pass
    assert sum(calls) == 0
    run_info = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run_info["cache"] == {"hits": 8, "misses": 0}
    assert {"s_fnn@v1", "s_fnn@v2", "combined@v1", "combined@v2", "s_pr"} == set(
        json.loads((tmp_path / "b" / "metrics.json").read_text()))

    # Another CLIP (new weights, new sha256) must not reuse the embeddings.
    store, data = env
    store2 = tmp_path / "store2"
    shutil.copytree(store, store2)
    spec = publish_tiny_clip(store2, "tiny-clip", seed=7)
    backend = load_clip(spec, store2, device="cpu")
    train_fnn_model(backend, TrainConfig(prompts=RandomWordConfig(n_pairs=100), fnn=FNNConfig(max_epochs=1)),
                    ModelStore(store2), "default")
    calls.clear()
    assert main(["--store", str(store2), "evaluate", str(data), "--out", str(tmp_path / "c"), "--quiet",
                 "--cache", str(tmp_path / "cache")]) == 0
    assert sum(calls) == 8


def test_test_time_views_get_their_own_cache_and_mixed_versions_are_refused(env, tmp_path, monkeypatch, capsys):
    calls = []
    original = Detector.embed

    def counting(self, images, heatmap=True, timings=None):
        calls.append(self.tta_views)
        return original(self, images, heatmap, timings)

    monkeypatch.setattr(Detector, "embed", counting)
    assert run(env, tmp_path / "plain") == 0
    monkeypatch.setenv("ZSAD_TTA_VIEWS", "4")
    calls.clear()
    assert run(env, tmp_path / "views") == 0  # same images, same CLIP: averaged embeddings are not the cached ones
    assert calls and set(calls) == {4}
    monkeypatch.delenv("ZSAD_TTA_VIEWS")

    store, _ = env
    store2 = tmp_path / "store2"
    shutil.copytree(store, store2)
    folder, manifest = ModelStore(store2).verify("default", "v2")
    ModelStore(store2).publish("default", {"fnn.safetensors": (folder / "fnn.safetensors").read_bytes()},
                               {**manifest, "tta": {"views": 8}}, "v3", make_current=False)
    capsys.readouterr()
    assert main(["--store", str(store2), "evaluate", str(env[1]), "--out", str(tmp_path / "mixed"), "--quiet",
                 "--versions", "v2,v3"]) == 1
    assert "ZSAD_TTA_VIEWS" in capsys.readouterr().err


def test_versions_with_other_window_scales_are_refused_not_scored_on_the_first_ones(env, tmp_path, capsys):
    """One CLIP pass serves every version, windows included: a version recommending other window scales would be
    scored on the base's windows and reported under its own name (it happened), so it is refused."""
    store, data = env
    store2 = tmp_path / "store2"
    shutil.copytree(store, store2)
    folder, manifest = ModelStore(store2).verify("default", "v2")
    other = [1] if list(manifest.get("windows", {}).get("scales", [])) != [1] else [2]
    ModelStore(store2).publish("default", {"fnn.safetensors": (folder / "fnn.safetensors").read_bytes()},
                               {**manifest, "windows": {"scales": other}}, "v3", make_current=False)
    capsys.readouterr()
    argv = ["--store", str(store2), "evaluate", str(data), "--quiet", "--versions", "v2,v3"]
    assert main(argv + ["--out", str(tmp_path / "mixed")]) == 1
    assert "ZSAD_WINDOW_SCALES" in capsys.readouterr().err
    # image metrics only (no windows needed): the same embeddings serve both
    assert main(argv + ["--out", str(tmp_path / "image"), "--no-pixel"]) == 0


def test_an_older_version_is_scored_on_its_own_clip_and_versions_on_other_clips_are_refused(env, tmp_path, capsys):
    """`--versions v1` once scored v1's FNN on the *current* version's CLIP (same width, so nothing failed): an FNN
    only means something on the CLIP it was trained on."""
    store, data = env
    store2 = tmp_path / "store2"
    shutil.copytree(store, store2)
    spec = publish_tiny_clip(store2, "tiny-clip", seed=5)  # tiny-clip@v2, now current
    backend = load_clip(spec, store2, device="cpu")
    cfg = TrainConfig(prompts=RandomWordConfig(n_pairs=100, seed=2), fnn=FNNConfig(max_epochs=2, seed=2))
    newest = train_fnn_model(backend, cfg, ModelStore(store2), "default").version  # default@v3 on tiny-clip@v2
    assert ModelStore(store2).current("default") == newest
    argv = ["--store", str(store2), "evaluate", str(data), "--quiet", "--no-pixel"]
    assert main(argv + ["--out", str(tmp_path / "old"), "--versions", "v1"]) == 0
    run = json.loads((tmp_path / "old" / "run.json").read_text())
    assert run["clip"]["version"] == "v1" and run["versions"] == ["v1"]
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "mixed"), "--versions", f"v1,{newest}"]) == 1
    assert "another CLIP" in capsys.readouterr().err


def test_malformed_dataset_is_a_clear_cli_error(env, tmp_path, capsys):
    store, _ = env
    bad = tmp_path / "bad" / "widget" / "test" / "scratch"
    bad.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad / "000.png")
    (tmp_path / "bad" / "widget" / "test" / "good").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "bad" / "widget" / "test" / "good" / "001.png")
    # The anomalous image has no ground_truth mask: refused, naming the image.
    rc = main(["--store", str(store), "evaluate", str(tmp_path / "bad"), "--layout", "mvtec", "--quiet"])
    assert rc == 1
    assert "000.png" in capsys.readouterr().err


def test_few_shot_evaluation_per_k_equals_the_detector_with_that_memory(env, tmp_path, capsys):
    from service.evaluation.cli import pick_shots
    from service.fewshot import build_memory, model_ref

    store, data = env
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(rng.integers(90, 110, (48, 64, 3), dtype=np.uint8)).save(refs / f"r{i}.png")
    capsys.readouterr()
    assert run(env, tmp_path / "out", "--shots", "0,2", "--reference-dir", str(refs)) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["shots"]) == {"0", "2"}
    out = tmp_path / "out"
    run_json = json.loads((out / "shots-2" / "run.json").read_text())
    assert run_json["mode"] == "few_shot" and run_json["shots"] == 2 and len(run_json["reference"]["widget"]) == 2
    rows = list(csv.DictReader((out / "shots-2" / "scores.csv").open()))
    zero = {r["path"]: r for r in csv.DictReader((out / "shots-0" / "scores.csv").open())}
    det = load_detector(Settings(model_store=store, device="cpu"))
    shots = pick_shots(sorted(refs.glob("*.png")), 2, 0)
    memory = build_memory(det.embed([load_image(p) for p in shots]), model_ref(det), 1, 4096)
    for row in rows[:3]:
        direct = det.detect([load_image(row["path"])], heatmap=False, memory=memory)[0].scores
        assert float(row["combined"]) == pytest.approx(direct["combined"], abs=1e-5)
        assert float(row["combined"]) != pytest.approx(float(zero[row["path"]]["combined"]), abs=1e-6)
    # The MVTec layout's own train/good is empty here: a clear error naming where it looked.
    assert run(env, tmp_path / "out2", "--shots", "1") == 1
    assert "train/good" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(env, tmp_path / "out3", "--shots", "1,x")
    assert exc.value.code == 2


def test_calibrated_localisation_per_defect_table_and_panels(env, tmp_path):
    """With train/good images the thresholds are calibrated per category; every panel is rendered and linked."""
    store, data = env
    local = tmp_path / "data"
    shutil.copytree(data, local)
    rng = np.random.default_rng(9)
    for i in range(6):
        Image.fromarray(rng.integers(90, 110, (48, 64, 3), dtype=np.uint8)).save(local / f"widget/train/good/{i:03d}.png")
    out = tmp_path / "out"
    assert main(["--store", str(store), "evaluate", str(local), "--out", str(out), "--quiet", "--cache", "",
                 "--worst", "2", "--best", "2", "--calibrate", "5", "--target-frr", "0.2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    loc = metrics["combined"]["widget"]
    for key in ("hit_at_1", "hit_at_1_shuffled", "region_precision", "region_recall"):
        assert loc[key] is None or 0.0 <= loc[key] <= 1.0, key
    assert loc["hit_at_1"] is not None and loc["hit_at_1_shuffled"] is not None
    assert metrics["s_pr"]["widget"]["region_precision"] is None  # regions only for the label variant
    per_defect = json.loads((out / "per_defect.json").read_text())
    assert per_defect["widget"]["scratch"]["n"] == 4 and per_defect["widget"]["scratch"]["pixel_auroc"] is not None
    md = (out / "report.md").read_text()
    assert "calibrated on 5 train/good images at 0.2 false rejects" in md
    assert "anomalous if score >= threshold" not in md and "anomalous if score > threshold" in md
    assert "| widget | scratch | 4 |" in md and "## Localisation" in md
    panels = sorted((out / "worst").glob("*.png")) + sorted((out / "best").glob("*.png"))
    assert len(panels) == 4
    figures = panels + list((out / "histograms").rglob("*.png")) + list((out / "curves").rglob("*.png"))
    for path in figures:
        assert f"({path.relative_to(out).as_posix()})" in md, path  # report.md links every figure
    with Image.open(panels[0]) as im:
        assert im.size[0] > 600 and im.size[1] > 200
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not blank
    assert "score" in md.split("## Worst misses")[1] and "threshold" in md.split("## Worst misses")[1]
