import json

import pytest

from service.store import ModelStore, StoreError


def test_publish_versions_and_current(tmp_path):
    store = ModelStore(tmp_path)
    v1 = store.publish("m", {"a.bin": b"one"}, {"kind": "test"})
    v2 = store.publish("m", {"a.bin": b"two"}, {"kind": "test"})
    assert (v1, v2) == ("v1", "v2")
    assert store.current("m") == "v2" and store.versions("m") == ["v1", "v2"]
    folder, manifest = store.verify("m")
    assert (folder / "a.bin").read_bytes() == b"two" and manifest["version"] == "v2"
    store.set_current("m", "v1")
    assert store.manifest("m")["version"] == "v1"
    with pytest.raises(StoreError, match="immutable"):
        store.publish("m", {"a.bin": b"x"}, {}, version="v1")


def test_interrupted_publish_leaves_previous_version_current(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    store.publish("m", {"a.bin": b"good"}, {"kind": "test"})

    import service.store as store_mod

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut mid-publish")

    monkeypatch.setattr(store_mod, "_write_json_durable", crash)
    with pytest.raises(KeyboardInterrupt):
        store.publish("m", {"a.bin": b"half"}, {"kind": "test"})
    monkeypatch.undo()
    assert store.current("m") == "v1" and store.versions("m") == ["v1"]
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".tmp")]
    assert store.verify("m")[0].joinpath("a.bin").read_bytes() == b"good"


def test_checksum_mismatch_is_refused(tmp_path):
    store = ModelStore(tmp_path)
    store.publish("m", {"a.bin": b"good"}, {"kind": "test"})
    (tmp_path / "m" / "v1" / "a.bin").write_bytes(b"evil")
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.verify("m")


@pytest.mark.parametrize("bad", ["../etc", "..", ".", "a/b", "a\\b", "", "x" * 65, "current", "/abs", "-x"])
def test_traversal_and_bad_names_are_refused(tmp_path, bad):
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="invalid"):
        store.publish(bad, {"a": b""}, {})
    with pytest.raises(StoreError):
        store.path("m", bad)
    assert list(tmp_path.iterdir()) == []


def test_bad_current_pointer_and_missing_version(tmp_path):
    store = ModelStore(tmp_path)
    store.publish("m", {"a.bin": b"x"}, {})
    (tmp_path / "m" / "current").write_text("../../etc\n")
    with pytest.raises(StoreError):
        store.path("m")
    with pytest.raises(StoreError, match="not found"):
        store.path("m", "v9")
    with pytest.raises(StoreError, match="no current"):
        store.path("other")


def test_manifest_lists_every_file_with_sha256(tmp_path):
    store = ModelStore(tmp_path)
    store.publish("m", {"a.bin": b"abc"}, {"kind": "k"})
    manifest = json.loads((tmp_path / "m" / "v1" / "manifest.json").read_text())
    assert manifest["files"] == {"a.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert manifest["created_at"] and manifest["name"] == "m"


def _rewrite_manifest(tmp_path, edit):
    path = tmp_path / "m" / "v1" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(version="v0"), "copied or renamed"),
    (lambda m: m.update(name="other"), "copied or renamed"),
    (lambda m: m.pop("files"), "lists no files"),
    (lambda m: m.update(files={}), "lists no files"),
    (lambda m: m.update(files={"a.bin": "not-a-sha"}), "no sha256"),
    (lambda m: m.update(files={"a.bin": m["files"]["a.bin"], "../x": "0" * 64}), "invalid file name"),
    (lambda m: m.update(files={"a.bin": m["files"]["a.bin"], "b.bin": "0" * 64}), "listed in the manifest but missing"),
])
def test_verify_refuses_manifests_that_do_not_describe_their_folder(tmp_path, edit, words):
    store = ModelStore(tmp_path)
    store.publish("m", {"a.bin": b"weights"}, {"kind": "test"})
    _rewrite_manifest(tmp_path, edit)
    with pytest.raises(StoreError, match=words) as info:
        store.verify("m", "v1")
    assert str(tmp_path) not in str(info.value)  # messages name the model, never the store's path


def test_verify_refuses_unlisted_files_and_errors_name_no_paths(tmp_path):
    store = ModelStore(tmp_path)
    store.publish("m", {"a.bin": b"weights"}, {"kind": "test"})
    (tmp_path / "m" / "v1" / "b.safetensors").write_bytes(b"sneaked in")
    with pytest.raises(StoreError, match="not listed in the manifest: b.safetensors"):
        store.verify("m")
    for call in (lambda: store.path("m", "v9"), lambda: store.path("other")):
        with pytest.raises(StoreError) as info:
            call()
        assert str(tmp_path) not in str(info.value)


def test_shipped_models_verify():
    """The embedded store's manifests list every file with its sha256 and describe their own folders."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "model_store"
    store = ModelStore(root)
    checked = [(name, v) for name in store.names() for v in store.versions(name)]
    assert ("default", "v3") in checked and ("tiny-factory-clip", "v3") in checked
    for name, version in checked:
        folder, manifest = store.verify(name, version)
        assert manifest["files"] and folder.name == version
