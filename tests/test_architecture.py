"""The shape of the code: no import cycles, serving without training code, score names from one registry.

The layer contracts themselves are import-linter's (`[tool.importlinter]` in pyproject.toml, run by .ci/run).
"""
from __future__ import annotations

import subprocess
import sys

import grimp
import pytest
import torch

from service.constants import SCORE_NAMES, SCORES, check_score_names
from tests.api.helpers import REPO, FakeDetector, make_settings, wait_ready


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-type-checking"])
def test_no_import_cycle_under_service(type_checking):
    graph = grimp.build_graph("service", exclude_type_checking_imports=not type_checking)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append([module, *graph.find_shortest_chain(importer=imported, imported=module)])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_serving_imports_no_training_or_evaluation_code():
    code = ("import sys, service.api.app, service.detector, service.cli; "
            "bad = sorted(m for m in sys.modules if m.startswith(('service.train', 'service.evaluation', "
            "'service.synthetic', 'sklearn', 'matplotlib'))); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_layer_uses_the_score_registry(tiny_backend):
    from service.api.schemas import DetectParams, Scores
    from service.fnn import FNN
    from service.scoring import all_scores, anchors_from_embeddings

    assert tuple(Scores.model_fields) == SCORE_NAMES
    assert [s.name for s in SCORES] == list(SCORE_NAMES) and len({s.alias for s in SCORES}) == len(SCORES)
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    anchors = anchors_from_embeddings("object", torch.randn(2, 8), torch.randn(2, 8))
    assert tuple(all_scores(emb, FNN(8, (4, 4, 4)), anchors)) == SCORE_NAMES
    with pytest.raises(Exception):
        Scores(**{name: 0.5 for name in SCORE_NAMES}, unknown=0.1)  # an unregistered key is refused, not dropped
    with pytest.raises(ValueError, match="registry"):
        check_score_names([*SCORE_NAMES, "new_score"])
    assert DetectParams(score=SCORE_NAMES[0]).score == SCORE_NAMES[0]


class _UnregisteredScore(FakeDetector):
    def detect(self, images, object_name=None, heatmap=True, timings=None):
        out = super().detect(images, object_name, heatmap, timings)
        for det in out:
            det.scores["new_score"] = 0.5
        return out


def test_a_detector_with_an_unregistered_score_is_refused_at_start_up(tmp_path):
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    app = create_app(make_settings(tmp_path, tmp_path), loader=lambda *a, **k: _UnregisteredScore())
    with TestClient(app) as client:
        body = wait_ready(client)
        assert body["status"] == "failed" and "new_score" in body["error"]["message"] and "registry" in body["error"]["message"]
