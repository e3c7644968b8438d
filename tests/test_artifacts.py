from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import models.artifacts as artifacts
from models.artifacts import (
    SCHEMA_VERSION,
    ArtifactError,
    ArtifactWriter,
    load_manifest,
    sha256_file,
    verify,
)

REPO = Path(__file__).resolve().parents[1]

FIELDS = {
    "corpus": {"checksum": "abc", "n_docs": 2, "source": "tiny"},
    "models": {"dense": {"path": "models/dense", "kind": "dense", "onnx_file": "model.onnx", "dim": 4}},
    "indexes": {"dense": {"type": "faiss", "path": "dense/index.faiss", "factory": "Flat"}},
    "docstore": {"path": "docs.sqlite"},
    "build": {"config": {"seed": 0}, "timings": {"index": 0.1}},
    "training": {"label_free": True},
}


def write_files(root: Path, payload: bytes = b"index-bytes") -> None:
    (root / "models" / "dense").mkdir(parents=True)
    (root / "models" / "dense" / "model.onnx").write_bytes(b"onnx" * 100)
    (root / "models" / "dense" / "encoder.json").write_text("{}")
    (root / "dense").mkdir()
    (root / "dense" / "index.faiss").write_bytes(payload)
    (root / "docs.sqlite").write_bytes(b"sqlite")


def build(final: Path, payload: bytes = b"index-bytes") -> Path:
    with ArtifactWriter(final) as w:
        write_files(w.path, payload)
        return w.finalize(FIELDS)


def siblings(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir())


def test_good_artifact_verifies(tmp_path) -> None:
    final = build(tmp_path / "art")
    manifest = verify(final)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.corpus.n_docs == 2
    assert set(manifest.files) == {
        "models/dense/model.onnx",
        "models/dense/encoder.json",
        "dense/index.faiss",
        "docs.sqlite",
    }
    entry = manifest.files["dense/index.faiss"]
    assert entry.bytes == len(b"index-bytes") and entry.sha256 == sha256_file(final / "dense/index.faiss")
    assert len(manifest.artifact_version) == 12 and manifest.created_at
    assert "numpy" in manifest.versions and "python" in manifest.versions
    assert manifest.training == {"label_free": True}
    assert verify(final, deep=False) == load_manifest(final) == manifest
    assert siblings(final) == ["art"]  # no temp dir left


def test_exception_inside_leaves_nothing(tmp_path) -> None:
    final = tmp_path / "art"
    with pytest.raises(RuntimeError, match="boom"):
        with ArtifactWriter(final) as w:
            write_files(w.path)
            raise RuntimeError("boom")
    assert siblings(final) == []


def test_exception_keeps_existing_artifact(tmp_path) -> None:
    final = build(tmp_path / "art")
    before = verify(final).artifact_version
    with pytest.raises(RuntimeError):
        with ArtifactWriter(final) as w:
            write_files(w.path, b"new")
            raise RuntimeError("boom")
    assert verify(final).artifact_version == before and siblings(final) == ["art"]


def test_replace_existing_artifact(tmp_path) -> None:
    final = build(tmp_path / "art", b"v1")
    (final / "stale.txt").write_text("from v1")
    v1 = verify(final).artifact_version
    build(final, b"version two")
    manifest = verify(final)
    assert manifest.artifact_version != v1
    assert (final / "dense/index.faiss").read_bytes() == b"version two"
    assert not (final / "stale.txt").exists() and siblings(final) == ["art"]


def test_replace_without_rename_exchange(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(artifacts, "_rename_exchange", lambda a, b: False)
    final = build(tmp_path / "art", b"v1")
    build(final, b"v2")
    assert (final / "dense/index.faiss").read_bytes() == b"v2" and siblings(final) == ["art"]
    verify(final)


def test_flipped_byte_is_caught(tmp_path) -> None:
    final = build(tmp_path / "art")
    target = final / "dense" / "index.faiss"
    data = bytearray(target.read_bytes())
    data[3] ^= 0x01
    target.write_bytes(bytes(data))
    verify(final, deep=False)  # same size: only hashing notices
    with pytest.raises(ArtifactError, match=r"checksum mismatch for dense/index\.faiss: expected [0-9a-f]{64}, got"):
        verify(final)


def test_missing_or_truncated_file_is_caught(tmp_path) -> None:
    final = build(tmp_path / "art")
    (final / "docs.sqlite").write_bytes(b"sq")
    with pytest.raises(ArtifactError, match="size mismatch for docs.sqlite"):
        verify(final, deep=False)
    (final / "docs.sqlite").unlink()
    with pytest.raises(ArtifactError, match="missing: docs.sqlite"):
        verify(final)
    (final / "extra.txt").write_text("unexpected files are fine")
    (final / "docs.sqlite").write_bytes(b"sqlite")
    verify(final)


def test_manifest_problems(tmp_path) -> None:
    final = build(tmp_path / "art")
    manifest_path = final / "manifest.json"
    good = json.loads(manifest_path.read_text())
    manifest_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json: invalid JSON"):
        verify(final)
    manifest_path.write_text(json.dumps({**good, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema_version 99 is not supported"):
        load_manifest(final)
    broken = {**good, "indexes": {"colbert": {"type": "colbert-token-index", "path": "colbert"}}}
    manifest_path.write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="indexes.colbert.path = 'colbert'"):
        verify(final)
    manifest_path.write_text(
        json.dumps({**good, "files": {**good["files"], "../escape": good["files"]["docs.sqlite"]}})
    )
    with pytest.raises(ArtifactError, match="outside the artifact"):
        verify(final)
    manifest_path.unlink()
    with pytest.raises(ArtifactError, match="manifest.json missing"):
        verify(final)
    with pytest.raises(ArtifactError, match="does not exist"):
        verify(tmp_path / "nowhere")


def test_version_covers_serving_settings(tmp_path) -> None:
    """The same files with another tuned weight are another version; editing a weight in the
    manifest by hand is caught; records that do not change what is served (build timings)
    leave the version alone; a schema 1 manifest (version over the files only) still loads."""
    tuned = {**FIELDS, "indexes": {"dense": {**FIELDS["indexes"]["dense"], "fusion_weight": 0.5}}}
    other = {**FIELDS, "indexes": {"dense": {**FIELDS["indexes"]["dense"], "fusion_weight": 0.6}}}
    timed = {**tuned, "build": {"config": {"seed": 0}, "timings": {"index": 9.9}}}
    versions = {}
    for name, fields in [("tuned", tuned), ("other", other), ("timed", timed)]:
        with ArtifactWriter(tmp_path / name) as w:
            write_files(w.path)
            w.finalize(fields)
        versions[name] = verify(tmp_path / name).artifact_version
    assert versions["tuned"] != versions["other"] and versions["tuned"] == versions["timed"]

    manifest_path = tmp_path / "tuned" / "manifest.json"
    good = json.loads(manifest_path.read_text())
    edited = json.loads(manifest_path.read_text())
    edited["indexes"]["dense"]["fusion_weight"] = 0.6
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(ArtifactError, match="the manifest was edited"):
        verify(tmp_path / "tuned")
    old = {**good, "schema_version": 1, "artifact_version": artifacts.artifact_version(verify(
        tmp_path / "other").files)}
    manifest_path.write_text(json.dumps(old))
    assert verify(tmp_path / "tuned").artifact_version == old["artifact_version"]


def test_finalize_rejects_dangling_reference(tmp_path) -> None:
    final = tmp_path / "art"
    with pytest.raises(ArtifactError, match="models.dense.onnx_file"):
        with ArtifactWriter(final) as w:
            (w.path / "models" / "dense").mkdir(parents=True)
            (w.path / "models" / "dense" / "encoder.json").write_text("{}")
            w.finalize({"models": {"dense": {"path": "models/dense", "onnx_file": "model.onnx"}}})
    assert siblings(final) == []


KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import models.artifacts as artifacts
    from models.artifacts import ArtifactWriter

    final, when = Path(sys.argv[1]), sys.argv[2]
    if when == "before-swap":  # die after manifest.json is written, before the rename
        artifacts._swap_into_place = lambda new, final: os.kill(os.getpid(), signal.SIGKILL)
    with ArtifactWriter(final) as w:
        (w.path / "dense").mkdir()
        (w.path / "dense" / "index.faiss").write_bytes(b"half")
        if when == "mid-write":
            os._exit(1)
        w.finalize({"indexes": {"dense": {"type": "faiss", "path": "dense/index.faiss"}}})
    """
)


def run_killed_build(final: Path, when: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", KILLED_BUILD, str(final), when], env=env, timeout=60).returncode


@pytest.mark.parametrize("when", ["mid-write", "before-swap"])
def test_killed_build_is_never_accepted(tmp_path, when: str) -> None:
    final = tmp_path / "art"
    assert run_killed_build(final, when) != 0
    assert not final.exists()
    with pytest.raises(ArtifactError):
        verify(final)
    leftovers = [n for n in siblings(final) if n.startswith(".art.tmp-")]
    assert len(leftovers) == 1  # the dead process's temp dir ...
    build(final)  # ... is cleaned up by the next writer
    assert siblings(final) == ["art"]
    verify(final)


def test_killed_rebuild_keeps_previous_artifact(tmp_path) -> None:
    final = build(tmp_path / "art")
    before = verify(final).artifact_version
    assert run_killed_build(final, "before-swap") != 0
    assert verify(final).artifact_version == before
