"""The README's "Try it" figures are the shipped model's: the flow of benchmarks/try_it.py runs in process (the real
app and CLI on model_store/) and every number of the README paragraph must match within 0.01."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _try_it():
    spec = importlib.util.spec_from_file_location("try_it", REPO / "benchmarks" / "try_it.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_try_it_figures_are_current(tmp_path, monkeypatch):
    monkeypatch.setenv("ZSAD_TORCH_THREADS", "1")
    try_it = _try_it()
    figures = try_it.figures(REPO / "model_store", tmp_path)
    assert figures["caught_all"] and figures["cli_agrees"] and figures["uncal_calibrated"] is False
    expected = try_it.paragraph(figures)
    quoted = try_it.readme_paragraph((REPO / "README.md").read_text())
    got, want = try_it.numbers(quoted), try_it.numbers(expected)
    fix = "regenerate it: python benchmarks/try_it.py --write-readme"
    assert len(got) == len(want), f"README paragraph out of date, {fix}\n{expected}"
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=0.01), f"README says {a}, the model gives {b}: {fix}"
    # the words too (labels, sources, counts), not only the decimals
    strip = try_it.numbers
    assert [w for w in quoted.split() if not strip(w)] == [w for w in expected.split() if not strip(w)]
