"""Versioned model store: `<root>/<name>/<version>/{manifest.json, files...}` plus a `<root>/<name>/current` pointer.

Why this shape: a service must be able to switch versions atomically and refuse anything that does not match its
manifest. Publishing writes into a temporary folder and renames it into place, and `current` is replaced with
`os.replace`, so a crash mid-publish leaves the previous version serving. Every file is listed in the manifest with
its sha256 and verified on load. Names and versions are validated, so no request can escape the store root.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CURRENT = "current"


class StoreError(Exception):
    """Anything wrong with the store: a bad name, a missing version, a checksum or dimension mismatch."""


def validate_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in {CURRENT}:
        raise StoreError(
            f"invalid model {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # --- reading ---------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def versions(self, name: str) -> list[str]:
        folder = self.root / validate_name(name)
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and NAME_RE.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=_version_key)

    def current(self, name: str) -> str | None:
        pointer = self.root / validate_name(name) / CURRENT
        if not pointer.is_file():
            return None
        return validate_name(pointer.read_text().strip(), "version")

    def path(self, name: str, version: str | None = None) -> Path:
        """Folder of `name` at `version` (default: current). Raises StoreError when absent.

        Messages name the model, never the store's absolute path: they reach API callers (reload answers,
        readiness)."""
        validate_name(name)
        if version is None:
            version = self.current(name)
            if version is None:
                known = ", ".join(self.names()) or "none"
                raise StoreError(f"model {name!r} has no current version in the store (models: {known})")
        folder = self.root / name / validate_name(version, "version")
        if not (folder / MANIFEST).is_file():
            raise StoreError(f"model {name!r} version {version!r} not found in the store")
        return folder

    def manifest(self, name: str, version: str | None = None) -> dict[str, Any]:
        folder = self.path(name, version)
        try:
            data = json.loads((folder / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"unreadable manifest of {name}@{folder.name}: {type(exc).__name__}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"manifest of {name}@{folder.name} is not a JSON object")
        return data

    def verify(self, name: str, version: str | None = None) -> tuple[Path, dict[str, Any]]:
        """Folder and manifest after checking that the manifest describes this folder and every file in it.

        Refused (StoreError): a manifest whose `name`/`version` differ from the folder asked for (a copied or
        renamed version), a manifest without a non-empty `files` map of sha256 hex digests, a listed file that is
        missing, unreadable or does not match its digest, and a file in the folder the manifest does not list (so
        no weights are ever loaded unchecked)."""
        folder = self.path(name, version)
        manifest = self.manifest(name, version)
        label = f"{name}@{folder.name}"
        if manifest.get("name") != name or manifest.get("version") != folder.name:
            raise StoreError(f"manifest of {label} describes {manifest.get('name')!r}@{manifest.get('version')!r}: "
                             "a copied or renamed version folder (publish it with `zsad train` or fix the manifest)")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise StoreError(f"manifest of {label} lists no files with their sha256: nothing could be verified")
        for filename, expected in files.items():
            if not isinstance(expected, str) or not SHA256_RE.match(expected):
                raise StoreError(f"manifest of {label} gives no sha256 for {filename!r}")
            try:
                file = folder / validate_name(filename, "file name")
            except StoreError:
                raise StoreError(f"manifest of {label} lists an invalid file name {filename!r}") from None
            if not file.is_file():
                raise StoreError(f"{label}: {filename} is listed in the manifest but missing")
            try:
                actual = sha256_file(file)
            except OSError as exc:
                raise StoreError(f"{label}: {filename} is unreadable ({type(exc).__name__})") from None
            if actual != expected:
                raise StoreError(f"{label}: checksum mismatch for {filename}: manifest {expected[:12]}…, "
                                 f"file {actual[:12]}…")
        unlisted = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in files)
        if unlisted:
            raise StoreError(f"{label}: files not listed in the manifest: {', '.join(unlisted)}")
        return folder, manifest

    # --- writing ---------------------------------------------------------------------------------------------
    def next_version(self, name: str) -> str:
        numbers = [int(v[1:]) for v in self.versions(name) if re.fullmatch(r"v\d+", v)]
        return f"v{max(numbers, default=0) + 1}"

    def publish(
        self,
        name: str,
        files: dict[str, bytes | Path],
        manifest: dict[str, Any],
        version: str | None = None,
        make_current: bool = True,
    ) -> str:
        """Write `files` and `manifest` as a new version, atomically. Returns the version."""
        validate_name(name)
        version = validate_name(version or self.next_version(name), "version")
        folder = self.root / name
        final = folder / version
        if final.exists():
            raise StoreError(f"model {name!r} version {version!r} already exists; versions are immutable")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            hashes = {}
            for filename, content in files.items():
                target = tmp / validate_name(filename, "file name")
                if isinstance(content, (bytes, bytearray)):
                    target.write_bytes(content)
                else:
                    shutil.copyfile(content, target)
                hashes[filename] = sha256_file(target)
            full = {**manifest, "name": name, "version": version, "files": hashes}
            full.setdefault("created_at", utc_now())
            _write_json_durable(tmp / MANIFEST, full)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if make_current:
            self.set_current(name, version)
        return version

    def set_current(self, name: str, version: str) -> None:
        self.path(name, version)  # must exist
        pointer = self.root / name / CURRENT
        tmp = pointer.with_name(f".tmp-current-{uuid.uuid4().hex}")
        tmp.write_text(version + "\n")
        os.replace(tmp, pointer)


def _write_json_durable(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _version_key(version: str) -> tuple[int, str]:
    match = re.fullmatch(r"v(\d+)", version)
    return (int(match.group(1)), version) if match else (1 << 30, version)
