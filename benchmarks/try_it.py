"""The README's "Try it" flow, run in process on the shipped model, and the figures the README quotes.

    python benchmarks/try_it.py                 # print the figures and the README paragraph
    python benchmarks/try_it.py --write-readme  # replace the paragraph between the try-it markers in README.md

The flow is the README's: a synthetic hex-nut set (`zsad synth dataset --kinds hex_nut --seed 7`), `POST /v1/detect`
before calibration, `POST /v1/calibrate/hex_nut?target_frr=0.05` with the 20 good training parts (few-shot by default:
they become the product's reference memory), `POST /v1/detect` after it, and `zsad score --product hex_nut`, through
the real app (FastAPI TestClient) and the real CLI.
`tests/test_readme.py` runs `figures()` and checks every number of the README paragraph within 0.01, so a new model
cannot leave the README stale. Baseline in the same run: the uncalibrated answers, against the calibrated ones.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- try-it figures: benchmarks/try_it.py -->", "<!-- /try-it figures -->"


def figures(store: Path | None = None, workdir: Path | None = None) -> dict:
    """Run the flow; the numbers the README quotes."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.cli import main as cli
    from service.db.engine import sqlite_url
    from service.settings import Settings
    from service.synthetic.dataset import DatasetSpec, write_mvtec

    with contextlib.ExitStack() as stack:
        tmp = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zsad-try-")))
        data = tmp / "synth"
        write_mvtec(data, DatasetSpec(kinds=("hex_nut",), seed=7), overwrite=True)
        nut = data / "hex_nut"
        settings = Settings(model_store=store or REPO / "model_store", device="cpu", precision="fp32",
                            results_path=tmp / "results.sqlite", thresholds_path=tmp / "thresholds.json")
        out: dict = {}
        with TestClient(create_app(settings)) as c:
            for _ in range(600):
                if c.get("/readyz").status_code == 200:
                    break
                import time

                time.sleep(0.1)

            def detect(path: Path, **params) -> dict:
                r = c.post("/v1/detect", files={"file": (path.name, path.read_bytes(), "image/png")}, params=params)
                r.raise_for_status()
                return r.json()

            hole = detect(nut / "test/hole/000.png", heatmap="png", line="L1")
            good = detect(nut / "test/good/000.png", line="L1")
            out["model"] = f"{hole['model']['name']}@{hole['model']['version']}"
            out["default_threshold"] = good["threshold"]
            out["uncal_source"], out["uncal_calibrated"] = good["threshold_source"], good["calibrated"]
            out["uncal_good"], out["uncal_good_label"] = good["score"], good["label"]
            out["uncal_hole"], out["uncal_hole_regions"] = hole["score"], len(hole["regions"])
            files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted((nut / "train/good").glob("*.png"))]
            cal = c.post("/v1/calibrate/hex_nut", files=files, params={"target_frr": 0.05})
            cal.raise_for_status()
            out["n_calibration"] = len(files)
            out["mode"] = cal.json().get("mode", "zero_shot")
            out["threshold"], out["pixel_threshold"] = cal.json()["threshold"], cal.json()["pixel_threshold"]
            goods = [detect(p, product="hex_nut") for p in sorted((nut / "test/good").glob("*.png"))]
            out["good_min"] = min(g["score"] for g in goods)
            out["good_max"] = max(g["score"] for g in goods)
            out["good_rejected"] = sum(g["label"] == "anomalous" for g in goods)
            out["good_mode"] = goods[0]["mode"]
            out["n_good"] = len(goods)
            bad = {d: detect(nut / f"test/{d}/000.png", product="hex_nut", heatmap="png")
                   for d in ("hole", "crack", "stain", "deformation")}
            caught = [bad[d] for d in ("hole", "crack", "stain")]
            out["caught_min"], out["caught_max"] = min(b["score"] for b in caught), max(b["score"] for b in caught)
            out["caught_all"] = all(b["label"] == "anomalous" and b["calibrated"] and b["regions"] for b in caught)
            out["caught_labels"] = {d: bad[d]["label"] for d in ("hole", "crack", "stain")}
            out["deformation"], out["deformation_label"] = bad["deformation"]["score"], bad["deformation"]["label"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            cli(["--store", str(settings.model_store), "score", str(nut / "test/hole/000.png"), "--product", "hex_nut",
                 "--db", sqlite_url(settings.results_path), "--device", "cpu"])
        row = json.loads(buf.getvalue().splitlines()[0])
        out["cli_label"], out["cli_threshold"] = row["label"], row["threshold"]
        out["cli_agrees"] = row["label"] == bad["hole"]["label"] and row["threshold"] == bad["hole"]["threshold"]
    return out


def paragraph(f: dict) -> str:
    return (
        f"Without calibration (`{f['model']}`) a good nut scores {f['uncal_good']:.2f} against the default threshold "
        f"{f['default_threshold']:.3f} (`threshold_source: {f['uncal_source']}`, `calibrated: "
        f"{str(f['uncal_calibrated']).lower()}`: {f['uncal_good_label']}); the answer says it cannot be trusted, and "
        f"`ZSAD_UNCALIBRATED=review` turns such labels into `review`. After calibrating on the {f['n_calibration']} good "
        f"training parts (`{f['mode']}`: they also become the product's reference memory, and answers say "
        f"`mode: {f['good_mode']}`) the threshold is {f['threshold']:.3f} and the pixel threshold {f['pixel_threshold']:.3f}; "
        f"the {f['n_good']} good test nuts score {f['good_min']:.2f}–{f['good_max']:.2f} ({f['good_rejected']} above "
        f"the threshold), and a hole, crack and stain {f['caught_min']:.2f}–{f['caught_max']:.2f} "
        + ("(anomalous, `calibrated: true`, each with at least one region)" if f["caught_all"] else
           "(" + ", ".join(f"{d} {label}" for d, label in f["caught_labels"].items()) + ")")
        + f". A deformation ({f['deformation']:.2f}, "
        f"{f['deformation_label']}) "
        + ("is caught too" if f["deformation_label"] == "anomalous" else "is missed: see \"The embedded default model\"")
        + f". `zsad score --product hex_nut` gives "
        f"the service's label and threshold ({f['cli_label']}, {f['cli_threshold']:.3f})."
    )


def numbers(text: str) -> list[float]:
    """The decimal figures of a paragraph (integers such as counts and seeds are compared as text)."""
    return [float(x) for x in re.findall(r"(?<![\w.@])\d+\.\d+", text)]


def readme_paragraph(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return " ".join(readme[start:end].split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=REPO / "model_store")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    f = figures(args.store)
    text = paragraph(f)
    print(json.dumps(f, indent=1))
    print(text)
    readme_path = REPO / "README.md"
    readme = readme_path.read_text()
    if args.write_readme:
        import textwrap

        start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
        block = "\n" + "\n".join(textwrap.wrap(text, 118, break_on_hyphens=False)) + "\n"
        readme_path.write_text(readme[:start] + block + readme[end:])
        readme = readme_path.read_text()
    quoted = numbers(readme_paragraph(readme))
    measured = numbers(text)
    drift = max((abs(a - b) for a, b in zip(quoted, measured)), default=0.0) if len(quoted) == len(measured) else 1.0
    print(f"RESULT name=try_it model={f['model']} uncalibrated_good={f['uncal_good']:.3f} "
          f"default_threshold={f['default_threshold']:.3f} threshold={f['threshold']:.3f} "
          f"pixel_threshold={f['pixel_threshold']:.3f} good_rejected={f['good_rejected']}/{f['n_good']} "
          f"readme_max_drift={drift:.4f}")


if __name__ == "__main__":
    main()
