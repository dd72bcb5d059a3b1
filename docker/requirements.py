"""Print the requirements of zsad, one per line, read from pyproject.toml (no package needs to be installed).

    python docker/requirements.py pyproject.toml                  # what serving needs: [project] dependencies
    python docker/requirements.py pyproject.toml --extra train    # the same plus the `train` extra
    python docker/requirements.py pyproject.toml --extra test --no-base

The Dockerfile installs this list before it copies the source, so the dependency layers are rebuilt only when
pyproject.toml changes, and then installs the project itself with `pip install --no-deps .`. Extras that name the
project itself (`zsad[train,eval]` in the `test` extra) are expanded, never printed, so pip is not asked to resolve
zsad from an index. Environment markers are kept: pip evaluates them.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def canonical(name: str) -> str:
    """PEP 503 normalised name: scikit_learn, Scikit.Learn and scikit-learn are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    m = _NAME.match(spec)
    if m is None:
        raise ValueError(f"not a requirement: {spec!r}")
    return canonical(m.group(1))


def requirements(pyproject: dict, extras: list[str] = (), base: bool = True) -> list[str]:
    """The requirement strings of `extras` (and of the base dependencies when `base`), in pyproject order, each once;
    an extra that names the project itself is replaced by what its extras require."""
    project = pyproject["project"]
    me = canonical(project["name"])
    optional = {canonical(k): v for k, v in project.get("optional-dependencies", {}).items()}
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(specs: list[str]) -> None:
        for spec in specs:
            m = _NAME.match(spec)
            if m is not None and canonical(m.group(1)) == me:
                for extra in (m.group(2) or "").split(","):
                    if extra.strip():
                        add_extra(extra.strip())
            elif spec not in out:
                out.append(spec)

    def add_extra(extra: str) -> None:
        key = canonical(extra)
        if key not in optional:
            raise KeyError(f"{project['name']} has no extra {extra!r} (known: {', '.join(sorted(optional))})")
        if key in seen_extras:
            return
        seen_extras.add(key)
        add(optional[key])

    if base:
        add(project.get("dependencies", []))
    for extra in extras:
        add_extra(extra)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject", type=Path, help="path to pyproject.toml")
    p.add_argument("--extra", action="append", default=[], help="add this extra's requirements (repeatable)")
    p.add_argument("--no-base", action="store_true", help="leave out the base [project] dependencies")
    args = p.parse_args(argv)
    with args.pyproject.open("rb") as f:
        data = tomllib.load(f)
    try:
        specs = requirements(data, args.extra, base=not args.no_base)
    except KeyError as exc:
        print(f"requirements.py: {exc.args[0]}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(s + "\n" for s in specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
