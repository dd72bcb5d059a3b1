"""Issue 14 D4/D5 on a tiny real model: a reload loads exactly the folder asked for, checks every file against the
manifest, answers 422 model_invalid for anything corrupt or mislabelled, and the old version keeps serving."""
from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app

from .helpers import image_bytes, make_settings, wait_ready


@pytest.fixture(scope="module")
def served(api_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reload-checks")
    store = tmp / "store"
    shutil.copytree(api_store, store)
    with TestClient(create_app(make_settings(tmp, store))) as c:
        assert wait_ready(c)["ready"]
        yield c, store


def _copy_version(store, new: str, edit=None):
    """`default/v1` copied to `default/<new>` as a careless operator would (manifest unchanged unless `edit`)."""
    folder = store / "default" / new
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(store / "default" / "v1", folder)
    if edit is not None:
        manifest = json.loads((folder / "manifest.json").read_text())
        edit(manifest, folder)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _relabel(version: str):
    def edit(manifest, folder):
        manifest["version"] = version
    return edit


def _truncate(folder):
    weights = folder / "fnn.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _assert_refused_and_v1_serves(c, version: str, words: str, tmp_root) -> None:
    r = c.post("/v1/models/reload", json={"version": version})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "model_invalid" and words in err["message"], err
    assert f"default@{version}" in err["message"] and "still serving default@v1" in err["message"]
    assert str(tmp_root) not in err["message"]  # names the model, never a path
    assert c.get("/readyz").json()["model"]["version"] == "v1"
    det = c.post("/v1/detect", content=image_bytes(), headers={"content-type": "image/png"})
    assert det.status_code == 200 and det.json()["model"]["version"] == "v1"


def test_d4_copied_folder_with_truncated_weights_is_422_not_the_old_version(served):
    c, store = served
    _truncate(_copy_version(store, "v5"))  # the exact steps
    _assert_refused_and_v1_serves(c, "v5", "describes 'default'@'v1'", store.parent)


def test_d4_copied_intact_folder_is_mislabelled_and_refused(served):
    c, store = served
    _copy_version(store, "v6")
    _assert_refused_and_v1_serves(c, "v6", "copied or renamed", store.parent)


def test_d5_manifest_without_files_is_422_even_with_truncated_weights(served):
    c, store = served

    def drop_files(manifest, folder):
        manifest["version"] = "v7"
        del manifest["files"]

    _truncate(_copy_version(store, "v7", drop_files))
    _assert_refused_and_v1_serves(c, "v7", "lists no files", store.parent)


def test_truncated_weights_with_a_matching_manifest_are_422(served):
    c, store = served
    folder = _copy_version(store, "v8", _relabel("v8"))
    _truncate(folder)
    _assert_refused_and_v1_serves(c, "v8", "checksum mismatch for fnn.safetensors", store.parent)


def test_an_unlisted_file_in_the_folder_is_422(served):
    c, store = served
    folder = _copy_version(store, "v9", _relabel("v9"))
    (folder / "extra.safetensors").write_bytes(b"not checked")
    _assert_refused_and_v1_serves(c, "v9", "not listed in the manifest: extra.safetensors", store.parent)


def test_a_good_relabelled_copy_loads(served):
    c, store = served
    _copy_version(store, "v10", _relabel("v10"))
    r = c.post("/v1/models/reload", json={"version": "v10"})
    # the manifest's content changed but every listed file still matches: a legitimate version
    assert r.status_code == 200 and r.json()["current"]["version"] == "v10", r.text
    assert c.post("/v1/models/reload", json={"version": "v1"}).status_code == 200


def test_startup_on_a_mislabelled_current_version_is_not_ready(api_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(api_store, store)
    _copy_version(store, "v2")
    (store / "default" / "current").write_text("v2\n")
    with TestClient(create_app(make_settings(tmp_path, store))) as c:
        body = wait_ready(c)
        assert body["status"] == "failed" and "default@v2" in body["error"]["message"], body
        assert str(tmp_path) not in body["error"]["message"]
