"""``index-build quickstart``: a corpus to a served artifact with no training (tiny corpus and
model): the base model's dense index, BM25, the hybrid served by default."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from index_build.cli import app
from service.app import create_app
from tests.service_fixtures import make_settings, wait_ready

pytest.importorskip("torch")  # the first use of a model exports it to ONNX


@pytest.fixture(scope="module")
def built(tiny_beir, tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    result = CliRunner().invoke(app, ["quickstart", str(tiny_beir), "--artifact-dir", str(root / "art"),
                                      "--model", str(tiny_bert), "--threads", "1"])
    assert result.exit_code == 0, result.output
    return root / "art", result.output


def test_quickstart_artifact_is_served_in_hybrid_mode(built, tiny_beir):
    art, output = built
    assert f"NRS_ARTIFACT_DIR={art} python -m service" in output
    printed = output[output.index('{\n  "artifact_dir"'):]
    built_info = json.loads(printed[: printed.index("\n}") + 2])
    assert set(built_info["stages"]) == {"encode", "bm25", "artifact"}
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["serving"]["default"]["first_stage"] == "hybrid" and manifest["training"]["distilled"] is False
    assert set(manifest["indexes"]) == {"dense", "bm25", "hybrid"} and set(manifest["models"]) == {"dense"}
    with TestClient(create_app(make_settings(art))) as client:
        wait_ready(client)
        info = client.get("/info").json()
        assert info["default_mode"]["first_stage"] == "hybrid" and info["default_mode"]["rerank"] == "none"
        assert info["rerank_modes"] == ["none"]
        r = client.post("/search", json={"query": "vitamin bone fracture", "k": 5})
        assert r.status_code == 200 and r.json()["first_stage"] == "hybrid" and len(r.json()["hits"]) == 5


def test_quickstart_dense_vectors_are_the_base_models(built, tiny_beir, tiny_bert, tmp_path, monkeypatch):
    """The index holds the same document vectors the builder's base model computes."""
    from index_build.cache import ArrayCache
    from index_build.data import load_collection
    from index_build.teachers import BiEncoderTeacher
    from models.dense_index import DenseIndex

    art, _ = built
    texts = load_collection(tiny_beir).doc_texts()
    base = BiEncoderTeacher(str(tiny_bert), texts, ArrayCache(tmp_path / "c.sqlite"), progress=False)
    index = DenseIndex.load(art / "dense" / "index.faiss")
    np.testing.assert_allclose(index.index.reconstruct_n(0, len(texts)), base.doc_embeddings, atol=1e-5)


def test_quickstart_reads_a_bare_corpus_file(tiny_beir, tiny_bert, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text((tiny_beir / "corpus.jsonl").read_text())
    result = CliRunner().invoke(app, ["quickstart", str(corpus), "--artifact-dir", str(tmp_path / "a"),
                                      "--model", str(tiny_bert), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["corpus"]["n_docs"] == 60


def test_quickstart_missing_corpus_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", str(tmp_path / "nope"), "--artifact-dir", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'nope' / 'corpus.jsonl'}: corpus file not found"]
