"""The hybrid first stage uses the fusion weight the builder tuned (manifest), unless the
settings override it; over a dense space of parts it fuses BM25 with each part."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from models.artifacts import ArtifactWriter, load_manifest
from service.search import retrieval_weights
from tests.service_fixtures import build_service_artifacts, make_settings


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_beir, tiny_bert):
    return build_service_artifacts(tmp_path_factory, tiny_beir, tiny_bert)


def test_manifest_weights_by_default_and_settings_override(artifacts):
    manifest = load_manifest(artifacts.first)
    tuned = manifest.indexes["hybrid"]
    assert tuned["tuned_on"] and 0.0 <= tuned["dense_weight"] <= 1.0
    assert retrieval_weights(make_settings(artifacts.first), manifest).hybrid == (tuned["dense_weight"],
                                                                         tuned["sparse_weight"])
    s = make_settings(artifacts.first, hybrid_dense_weight=0.2, hybrid_sparse_weight=0.8)
    assert retrieval_weights(s, manifest).hybrid == (0.2, 0.8)


def test_half_set_weights_are_rejected(artifacts):
    with pytest.raises(ValidationError, match="set both hybrid_dense_weight and hybrid_sparse_weight"):
        make_settings(artifacts.first, hybrid_dense_weight=0.2)


def _with_hybrid(src: Path, dst: Path, **hybrid: Any) -> Path:
    """A copy of artifact ``src`` whose manifest's hybrid entry has ``hybrid`` merged in."""
    manifest = load_manifest(src)
    with ArtifactWriter(dst) as w:
        shutil.copytree(src, w.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        fields = manifest.model_dump(
            mode="json", exclude={"files", "artifact_version", "schema_version", "created_at", "versions"})
        fields["indexes"]["hybrid"] = {**fields["indexes"]["hybrid"], **hybrid}
        w.finalize(fields)
    return dst


def test_a_hybrid_over_dense_parts_scores_every_candidate_by_each_part(artifacts, tmp_path):
    """An artifact whose hybrid names dense parts (as an asymmetric build's does) serves the
    per-part fusion: the service's hybrid is :func:`models.retrieval.fuse_parts` over its own
    dense and BM25 lists, the documents' vectors read back from the FAISS index."""
    from models.retrieval import Ranked, fuse_parts
    from service.search import SearchEngine

    dim = load_manifest(artifacts.first).indexes["dense"]["dim"]
    parts = {"dims": [dim // 2, dim - dim // 2], "weights": [0.25, 0.75]}
    engine = SearchEngine.load(_with_hybrid(artifacts.first, tmp_path / "parts", dense_parts=parts),
                               make_settings(tmp_path / "parts"))
    try:
        weights = engine.weights
        assert weights.dense_parts is not None and weights.dense_parts.weights == (0.25, 0.75)
        assert engine.info()["hybrid_weights"]["dense_parts"] == [0.25, 0.75]
        query, depth = "the first document", 10
        q = engine.encode("dense", [query]).vectors
        dense_s, dense_i = engine.dense_index.search(q, depth)
        bm25 = engine.bm25.scores(query)
        sparse_s, sparse_i = engine.bm25.search([query], depth)
        keep = sparse_i[0] >= 0
        expected = fuse_parts(Ranked(dense_i[0], dense_s[0]), Ranked(sparse_i[0][keep], sparse_s[0][keep]), bm25,
                              q[0], engine.dense_index.vectors, weights.dense_parts, weights.hybrid, depth)
        got = engine.search(query, k=depth, candidates=depth, first_stage="hybrid", rerank="none")
        ids = engine.docstore.ids
        assert [h.id for h in got.hits] == [ids[int(j)] for j in expected.indices]
    finally:
        engine.close()


def test_dense_parts_that_do_not_fit_the_index_stop_start_up(artifacts, tmp_path):
    from models.artifacts import ArtifactError
    from service.search import SearchEngine

    bad = _with_hybrid(artifacts.first, tmp_path / "wide", dense_parts={"dims": [4, 4000], "weights": [1, 1]})
    with pytest.raises(ArtifactError, match="hybrid dense parts span 4004 dimensions"):
        SearchEngine.load(bad, make_settings(bad))
    broken = _with_hybrid(artifacts.first, tmp_path / "broken", dense_parts={"dims": [4, 4]})
    with pytest.raises(ArtifactError, match="malformed fusion weights"):
        SearchEngine.load(broken, make_settings(broken))


@pytest.mark.parametrize(("first_stage", "rerank", "flags", "expected"), [
    ("dense", "colbert", (True, True, True), ("dense",)),          # tokens from the dense pass
    ("dense", "colbert", (False, True, True), ("dense", "colbert")),  # one pass off: ColBERT's own
    ("hybrid", "none", (True, True, True), ("hybrid",)),
    ("hybrid", "colbert", (True, True, True), ("hybrid",)),        # tokens from the head's pass
    ("hybrid", "colbert", (True, True, False), ("dense", "hybrid")),  # an artifact without the head's map
    ("hybrid", "colbert", (False, True, False), ("hybrid", "colbert")),
    ("hybrid", "colbert", (True, False, False), ("dense",)),       # no head: the dense pass serves both
    ("sparse", "colbert", (True, True, True), ("dense",)),
    ("sparse", "none", (True, True, True), ()),
])
def test_a_request_runs_the_fewest_query_passes(first_stage, rerank, flags, expected):
    """``(one_pass, hybrid_head, hybrid_one_pass)``: the query encoders a request runs."""
    from service.search import SearchOptions

    opts = SearchOptions(k=10, candidates=100, rerank=rerank, first_stage=first_stage)
    assert opts.encoders_needed(*flags) == expected
