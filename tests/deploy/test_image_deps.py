"""What the serving image installs, and in which order.

Serving needs the [project] dependencies of pyproject.toml and nothing else: scikit-learn (`zsad train`) and matplotlib
(`zsad evaluate`) live in the `train` and `eval` extras, and the image's serving venv never gets them. The Dockerfile
installs the dependencies (listed by docker/requirements.py from pyproject.toml alone) before it copies the source, so
an edit to service/ rebuilds one small layer, and installs the project itself with `--no-deps`. The `test` extra pulls
everything the test suite imports.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
import textwrap

import pytest
from packaging.requirements import Requirement

from .conftest import REPO
from .test_container import DOCKERFILE, instructions, stages

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = REPO / "pyproject.toml"
SCRIPT = REPO / "docker" / "requirements.py"
TRAIN_ONLY = {"scikit-learn"}  # service/fnn.py: auroc (training's validation metric)
EVAL_ONLY = {"matplotlib"}  # service/evaluation/report.py: the report's figures
# Top-level modules the serving path imports that come from these distributions (import name != distribution name).
BLOCKED_MODULES = ("sklearn", "matplotlib")


def _script():
    spec = importlib.util.spec_from_file_location("zsad_docker_requirements", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reqs = _script()


def pyproject() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def names(specs: list[str]) -> set[str]:
    return {reqs.requirement_name(s) for s in specs}


def builder_runs() -> list[str]:
    return [a for i, a in stages()["builder"] if i == "RUN"]


def dockerfile_lists() -> dict[str, list[str]]:
    """Run docker/requirements.py exactly as the builder stage does: {output file: the requirements it holds}."""
    builder = stages()["builder"]
    copies = {}  # image path -> repo path, for the COPY instructions of the builder stage
    for ins, args in builder:
        if ins == "COPY" and "--from=" not in args:
            words = [w for w in args.split() if not w.startswith("--")]
            for src in words[:-1]:
                dest = words[-1]
                copies[dest if not dest.endswith("/") else dest + src.rsplit("/", 1)[-1]] = src
    calls = re.findall(r"python (\S+requirements\.py) (\S+)((?: --[\w-]+(?: [\w-]+)?)*) > (\S+);", " ".join(builder_runs()))
    assert calls, "the builder stage writes its requirement lists with docker/requirements.py"
    out = {}
    for script, pyproject_arg, options, target in calls:
        assert copies.get(script) == "docker/requirements.py", (script, copies)
        assert copies.get("./" + pyproject_arg, copies.get(pyproject_arg)) == "pyproject.toml", (pyproject_arg, copies)
        r = subprocess.run([sys.executable, str(SCRIPT), str(PYPROJECT), *options.split()], capture_output=True,
                           text=True, timeout=60, check=True)
        out[target] = r.stdout.splitlines()
    return out


# --- pyproject: serving vs extras -----------------------------------------------------------------------------------------
def test_serving_dependencies_leave_out_training_and_evaluation_packages():
    project = pyproject()["project"]
    base = names(project["dependencies"])
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    assert not (TRAIN_ONLY | EVAL_ONLY) & base, base
    assert TRAIN_ONLY <= extras["train"] and EVAL_ONLY <= extras["eval"]
    # scipy stays a serving dependency: service/heatmap.py (the detect path's regions) imports scipy.ndimage.
    assert "scipy" in base
    assert "from scipy import ndimage" in (REPO / "service" / "heatmap.py").read_text()
    # alembic too: the service migrates its database at start-up and the entrypoint runs `zsad db upgrade`.
    assert "alembic" in base


def test_the_test_extra_resolves_train_eval_postgres_and_the_team_tools():
    test = names(reqs.requirements(pyproject(), ["test"], base=False))
    assert TRAIN_ONLY | EVAL_ONLY | {"psycopg"} <= test
    assert {"ruff", "import-linter", "schemathesis", "tritonclient"} <= test
    assert "zsad" not in test, "the self-reference is expanded, never printed"
    triton = next(s for s in reqs.requirements(pyproject(), ["test"], base=False) if s.startswith("tritonclient"))
    assert "http" in Requirement(triton).extras


def test_requirements_script_expands_self_references_and_refuses_unknown_extras(tmp_path):
    toml = {"project": {"name": "Zsad", "dependencies": ["a>=1"], "optional-dependencies": {
        "x": ["b; python_version >= '3'"], "y": ["zsad[x]", "c"], "all": ["ZSAD[y,x]", "a>=1"]}}}
    assert reqs.requirements(toml, ["all"]) == ["a>=1", "b; python_version >= '3'", "c"]
    assert reqs.requirements(toml, ["y"], base=False) == ["b; python_version >= '3'", "c"]
    with pytest.raises(KeyError, match="no extra 'nope'"):
        reqs.requirements(toml, ["nope"])
    r = subprocess.run([sys.executable, str(SCRIPT), str(PYPROJECT), "--extra", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "no extra 'nope'" in r.stderr


def _closure(roots: list[str]) -> set[str]:
    """Installed distributions that requirement strings `roots` bring in: dependencies of dependencies, markers
    evaluated for this interpreter and the requested extras followed, as pip would."""
    seen: set[tuple[str, frozenset[str]]] = set()
    found: set[str] = set()
    todo = [Requirement(s) for s in roots]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = (reqs.canonical(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        found.add(key[0])
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue
        for sub in map(Requirement, requires):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras | {""}):
                sub.marker = None
                todo.append(sub)
    return found


def test_the_test_extra_pulls_every_distribution_the_tests_import():
    """Each third-party module tests/ imports belongs to a distribution that `pip install .[test]` brings in."""
    modules: set[str] = set()
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"service", "tests", "__future__"}
    by_module = md.packages_distributions()
    installed = _closure(reqs.requirements(pyproject(), ["test"]))
    missing = {}
    for module in sorted(modules):
        dists = {reqs.canonical(d) for d in by_module.get(module, [])}
        if not dists:
            continue  # not installed here: the test that imports it fails or skips on its own
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, f"tests import these, but .[test] does not install them: {missing}"


# --- the Dockerfile ------------------------------------------------------------------------------------------------------
def test_the_image_installs_the_serving_list_and_trains_with_the_train_extra():
    lists = dockerfile_lists()
    serving = lists["requirements.txt"]
    assert names(serving) == names(pyproject()["project"]["dependencies"])
    assert not (TRAIN_ONLY | EVAL_ONLY) & names(serving), serving
    train = names(lists["requirements-train.txt"])
    assert TRAIN_ONLY <= train and not EVAL_ONLY & train
    extra_default = next(a for i, a in stages()["builder"] if i == "ARG" and a.startswith("EXTRA_PIP_PACKAGES="))
    assert not any(n in extra_default for n in TRAIN_ONLY | EVAL_ONLY)
    assert any("pip install -r requirements.txt $EXTRA_PIP_PACKAGES" in r for r in builder_runs())
    # the train extra is installed in the models stage, in the RUN that trains, before `zsad ... train`
    models_run = " ".join(a for i, a in stages()["models"] if i == "RUN")
    assert 0 <= models_run.index("pip install -r /src/requirements-train.txt") < models_run.index(" train --model")
    # ... and the runtime's venv comes from the builder (serving deps only), never from the models stage
    venv_copies = [a for i, a in stages()["runtime"] if i == "COPY" and "/opt/venv" in a]
    assert venv_copies == ["--from=builder /opt/venv /opt/venv"]


def test_dependencies_are_installed_before_the_source_with_a_pip_cache_mount():
    first_line = DOCKERFILE.read_text().splitlines()[0]
    assert re.fullmatch(r"# syntax=docker/dockerfile:1(\.\d+)*", first_line), "cache mounts need the BuildKit syntax"
    builder = stages()["builder"]
    pos = {n: (i, a) for n, (i, a) in enumerate(builder)}
    deps = next(n for n, (i, a) in pos.items() if i == "RUN" and "pip install -r requirements.txt" in a)
    source = next(n for n, (i, a) in pos.items() if i == "COPY" and a.split()[0] == "service")
    project = next(n for n, (i, a) in pos.items() if i == "RUN" and re.search(r"pip install (--\S+ )*\.(\s|$)", a))
    assert deps < source < project
    copied_before_deps = {w for n, (i, a) in pos.items() if i == "COPY" and n < deps for w in a.split()[:-1]}
    assert copied_before_deps == {"pyproject.toml", "docker/requirements.py"}, copied_before_deps
    assert "pip install --no-deps ." in pos[project][1], "the project adds no dependency of its own"
    assert "pip check" in pos[project][1], "the build fails if the list installed before the source fell short"
    pip_runs = [a for i, a in instructions() if i == "RUN" and "pip install" in a]
    assert len(pip_runs) >= 4  # torch, the dependencies, the project, the train extra
    for run in pip_runs:
        assert run.startswith("--mount=type=cache,target=/root/.cache/pip "), run
        assert "--no-cache-dir" not in run, run


def test_base_images_are_pinned_by_digest():
    ins = instructions()
    first_from = next(n for n, (i, _) in enumerate(ins) if i == "FROM")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins[:first_from] if i == "ARG" and "=" in a}
    for name, repo in (("PYTHON_IMAGE", "python:3.11-slim"), ("CUDA_IMAGE", "nvidia/cuda:")):
        assert args[name].startswith(repo), args[name]
        assert re.search(r"^[^@\s]+:[\w.-]+@sha256:[0-9a-f]{64}$", args[name]), f"{name} is not pinned: {args[name]}"


# --- serving really runs without the extras -----------------------------------------------------------------------------
_SERVE_WITHOUT_EXTRAS = textwrap.dedent("""
    import importlib.abc, sys
    from pathlib import Path

    BLOCKED = set(sys.argv[3].split(","))

    class Hide(importlib.abc.MetaPathFinder):
        # As if not installed: no finder finds these (find_spec is None, import raises ModuleNotFoundError).
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    for name in BLOCKED:
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"could not hide {name}")

    from fastapi.testclient import TestClient
    from service.api.app import create_app
    from service.cli import build_parser
    from tests.api.helpers import image_bytes, make_settings, wait_ready

    build_parser()  # `zsad serve` parses with every subcommand registered
    app = create_app(make_settings(Path(sys.argv[2]), Path(sys.argv[1])))
    with TestClient(app) as c:
        assert wait_ready(c)["ready"]
        for heatmap in ("json", "png"):
            r = c.post("/v1/detect", files={"file": ("p.png", image_bytes("PNG", (96, 64)), "image/png")},
                       data={"heatmap": heatmap})
            assert r.status_code == 200, r.text
            assert isinstance(r.json()["regions"], list)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("served without", ",".join(sorted(BLOCKED)))
""")


def test_serving_runs_without_the_train_and_eval_extras(deploy_store, tmp_path):
    """Load the model and answer detect requests (heatmap and regions included) with sklearn and matplotlib
    unimportable, as in the image."""
    r = subprocess.run([sys.executable, "-c", _SERVE_WITHOUT_EXTRAS, str(deploy_store), str(tmp_path),
                        ",".join(BLOCKED_MODULES)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "served without matplotlib,sklearn" in r.stdout
