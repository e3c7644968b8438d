"""The builder evaluates what the service serves: on one tiny artifact, the builder's
evaluation helpers (first stages, fusion, rerank interpolation at the artifact's weights)
and the HTTP service rank every query identically in every mode."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.retrieval import RetrievalWeights
from service.app import create_app
from tests.conftest import tiny_overrides
from tests.service_fixtures import ServiceArtifacts, build_service_artifacts, make_settings, wait_ready

DEPTH = 20  # the first stage's depth in both (the service: max(k, candidates))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_beir, tiny_bert) -> ServiceArtifacts:
    return build_service_artifacts(tmp_path_factory, tiny_beir, tiny_bert)


@pytest.fixture(scope="module")
def pipeline(artifacts, tiny_beir, tiny_bert):
    """The pipeline that built the artifact (every stage cached: nothing is rebuilt)."""
    from index_build.config import load_config
    from index_build.stages import Pipeline

    base = artifacts.first.parent
    return Pipeline(load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, base)), progress=False)


@pytest.fixture(scope="module")
def client(artifacts) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(artifacts.first))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def queries(pipeline) -> tuple[list[str], list[str]]:
    split = pipeline.collection.split_queries(pipeline.cfg.data.test_split)
    return list(split), list(split.values())


def served(client: TestClient, text: str, first_stage: str, rerank: str) -> list[tuple[str, float]]:
    body = {"query": text, "k": DEPTH, "candidates": DEPTH, "first_stage": first_stage, "rerank": rerank}
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    return [(h["id"], h["score"]) for h in r.json()["hits"]]


def ranking(run: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(run.items(), key=lambda kv: -kv[1])


def assert_same(built: list[tuple[str, float]], serve: list[tuple[str, float]], where: str) -> None:
    assert [d for d, _ in built] == [d for d, _ in serve], where
    np.testing.assert_allclose([s for _, s in built], [s for _, s in serve], rtol=1e-4, atol=1e-4, err_msg=where)


@pytest.fixture(scope="module")
def weights(artifacts) -> RetrievalWeights:
    manifest = json.loads((artifacts.first / "manifest.json").read_text())
    return RetrievalWeights.from_manifest(manifest["indexes"], manifest["models"])


@pytest.fixture(scope="module")
def firsts(pipeline, queries, weights):
    from models.encoders import DenseEncoder

    _, texts = queries
    dense_q = DenseEncoder(pipeline.onnx_dir("dense"), threads=1).encode_queries(texts)
    return pipeline.first_stage_lists(texts, dense_q, weights.hybrid[0], DEPTH)


@pytest.mark.parametrize("first_stage", ["dense", "sparse", "hybrid"])
def test_first_stages_rank_as_served(client, pipeline, queries, firsts, first_stage):
    qids, texts = queries
    run = pipeline.run_of(qids, firsts[first_stage])
    for qid, text in zip(qids, texts):
        assert_same(ranking(run[qid]), served(client, text, first_stage, "none"), f"{qid} {first_stage}")


@pytest.mark.parametrize("first_stage", ["dense", "sparse", "hybrid"])
@pytest.mark.parametrize("rerank", ["colbert", "cross-encoder"])
def test_reranks_rank_as_served(client, pipeline, queries, firsts, weights, first_stage, rerank):
    """The builder's rerank of each first stage at the artifact's weight. The cross-encoder's
    scores are the builder's own (the same ONNX graph); ColBERT's are MaxSim over the
    artifact's compressed token store, which the builder's float tokens only approximate."""
    qids, texts = queries
    lists = firsts[first_stage]
    if rerank == "cross-encoder":
        cand_texts = [[pipeline.corpus_texts[int(j)] for j in c] for c, _ in lists]
        scores = pipeline.cross_encoder_scores(texts, cand_texts)
    else:
        engine = client.app.state.service.engine  # type: ignore[attr-defined]
        q = engine.colbert_encoder.encode_queries(texts)
        scores = [engine.token_index.rerank(q[r], c) for r, (c, _) in enumerate(lists)]
    run = pipeline.run_of(qids, lists, scores, weights.rerank_weight(rerank, first_stage))
    for qid, text in zip(qids, texts):
        assert_same(ranking(run[qid]), served(client, text, first_stage, rerank), f"{qid} {first_stage}+{rerank}")
