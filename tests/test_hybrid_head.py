"""The asymmetric student's hybrid head (``asymmetric.hybrid_head``): the base model with ridge
maps to the teacher's parts, exported beside the trained student, chosen on the dev slice as
the closer copy of the teacher's query vectors, packaged as the artifact's ``hybrid`` model
and run by the service for hybrid requests only, ranking as the builder evaluates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from fastapi.testclient import TestClient  # noqa: E402

from index_build.config import hashed_section, load_config  # noqa: E402
from index_build.context import HYBRID_HEAD  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402
from index_build.tune import tune_hybrid  # noqa: E402
from service.app import create_app  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.service_fixtures import make_settings, wait_ready  # noqa: E402

DEPTH = 20
RECIPE = ['students.kinds=["asymmetric","colbert"]', "train.colbert.epochs=1", "asymmetric.epochs=2",
          "asymmetric.batch=8", "asymmetric.eval_every=10", "asymmetric.pool_size=8", "asymmetric.pool_depth=10",
          "evaluate.rerank_depth=20"]


@pytest.fixture(scope="module")
def ridge_built(tiny_beir, tiny_bert, tmp_path_factory):
    """A tiny build whose hybrid is served by the ridge head."""
    root = tmp_path_factory.mktemp("hybrid-head")
    # a student that moves off its ridge start (the parameters averaged over the later checks),
    # so the head and the student are different encoders
    moved = ["asymmetric.lr=1e-3", 'asymmetric.checkpoint="average"']
    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, root, *RECIPE, *moved,
                                               'asymmetric.hybrid_head="ridge"'))
    p = Pipeline(cfg, progress=False)
    return p, p.run_all()


@pytest.fixture(scope="module")
def client(ridge_built) -> Iterator[TestClient]:
    p, _ = ridge_built
    with TestClient(create_app(make_settings(p.cfg.artifact_dir))) as c:
        wait_ready(c)
        yield c


def test_the_choice_is_checked_and_keys_the_head_stage_only(tiny_beir, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="hybrid_head must be one of auto, ridge, student"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'asymmetric.hybrid_head="mlp"'))
    auto = Pipeline(load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, *RECIPE)), progress=False)
    ridge = Pipeline(load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, *RECIPE,
                                                          'asymmetric.hybrid_head="ridge"')), progress=False)
    # the student is trained and exported once whichever head serves the hybrid
    assert "hybrid_head" not in hashed_section(ridge.cfg.asymmetric)
    assert ridge.export_key("asymmetric") == auto.export_key("asymmetric")
    assert ridge.hybrid_head_key() != auto.hybrid_head_key()
    assert ridge.evaluate_key() != auto.evaluate_key() and ridge.artifact_key() != auto.artifact_key()


def test_the_ridge_head_is_exported_and_serves_the_builds_hybrid_rows(ridge_built):
    p, result = ridge_built
    record = result["stages"]["head-asymmetric"]
    assert record["serves_hybrid"] == "ridge" and record["fit_queries"] > 0
    assert record["parity_max_abs_diff"] <= 1e-4 and p.hybrid_head() is not None
    assert (p.onnx_dir(HYBRID_HEAD) / "model.onnx").is_file()
    systems = result["systems"]
    assert {"asym-hybrid", "asym-hybrid-student", "served-default"} <= set(systems)
    queries = list(p.collection.split_queries("test").values())
    qids = list(p.collection.split_queries("test"))
    depth = p.cfg.evaluate.rerank_depth  # the depth the rows are evaluated at
    hw = tune_hybrid(p, depth)["dense_weight"]
    head, student = p.hybrid_queries(queries), p.dense_queries(queries)
    assert head is not None and head.shape == student.shape
    qrels = p.collection.qrels["test"]
    from index_build.metrics import metrics

    for row, vectors in (("asym-hybrid", head), ("asym-hybrid-student", student)):
        lists = p.first_stage_lists(queries, student, hw, depth, stages=("hybrid",), hybrid_queries=vectors)
        assert metrics(qrels, p.run_of(qids, lists["hybrid"]))["nDCG@10"] == pytest.approx(
            systems[row]["nDCG@10"], abs=1e-4), row
    manifest = json.loads((Path(p.cfg.artifact_dir) / "manifest.json").read_text())
    assert manifest["serving"]["hybrid_model"] == "hybrid" and "hybrid" in manifest["models"]
    assert manifest["training"]["hybrid_head"]["serves_hybrid"] == "ridge"


def test_the_service_runs_the_head_for_hybrid_requests_only(ridge_built, client, monkeypatch):
    p, _ = ridge_built
    engine = client.app.state.service.engine
    assert client.get("/info").json()["models"]["hybrid"]["dim"] == engine.dense_encoder.dim
    runs: list[str] = []

    def counted(role: str, run):
        def wrapped(*args, **kwargs):
            runs.append(role)
            return run(*args, **kwargs)
        return wrapped

    for role in ("dense", "hybrid"):
        session = getattr(engine, f"{role}_encoder").session
        monkeypatch.setattr(session, "run", counted(role, session.run))
    queries = list(p.collection.split_queries("test").values())
    hw = tune_hybrid(p)["dense_weight"]
    lists = p.first_stage_lists(queries, p.dense_queries(queries), hw, DEPTH, hybrid_queries=p.hybrid_queries(queries))
    doc_ids = p.collection.doc_ids
    for stage, encoder in (("dense", "dense"), ("hybrid", "hybrid")):
        for r, text in enumerate(queries):
            runs.clear()
            body = {"query": text, "k": DEPTH, "candidates": DEPTH, "first_stage": stage, "rerank": "none"}
            hits = client.post("/search", json=body).json()["hits"]
            assert runs == [encoder], (stage, runs)  # one pass, of that stage's own encoder
            cands, scores = lists[stage][r]
            assert [h["id"] for h in hits] == [doc_ids[int(j)] for j in cands], (stage, text)
            np.testing.assert_allclose([h["score"] for h in hits], scores, rtol=1e-4, atol=1e-4)


def test_a_colbert_rerank_of_the_hybrid_takes_its_tokens_from_the_heads_pass(ridge_built, client, monkeypatch):
    """hybrid+colbert runs the hybrid head alone: the artifact carries a second token map,
    fitted on the head's states, and the service ranks as the builder's tokens from that
    pass rank through the same engine; the builder's hybrid+colbert row scores those tokens."""
    from index_build.context import HYBRID_HEAD
    from models.encoders import project_query_tokens

    p, result = ridge_built
    assert p.colbert_query_source("hybrid") == HYBRID_HEAD and p.colbert_query_source("dense") == "asymmetric"
    manifest = json.loads((Path(p.cfg.artifact_dir) / "manifest.json").read_text())
    entry = manifest["models"]["colbert"]["hybrid_query_token_map"]
    assert entry["from"] == "hybrid" and 0.0 < entry["token_cosine"] <= 1.0
    head_map = p.query_token_map(HYBRID_HEAD)["map"]
    np.testing.assert_allclose(np.load(Path(p.cfg.artifact_dir) / "models" / "colbert" / entry["file"]), head_map,
                               atol=1e-6)
    assert not np.allclose(head_map, p.query_token_map()["map"])  # fitted on another encoder's states
    engine = client.app.state.service.engine
    assert engine.hybrid_one_pass and client.get("/info").json()["models"]["colbert"]["hybrid_query_tokens"] == (
        "hybrid pass")
    opts = engine.resolve_options(k=DEPTH, candidates=DEPTH, first_stage="hybrid", rerank="colbert")
    assert engine.encoders_needed(opts) == ("hybrid",)
    runs: list[str] = []
    for role in ("dense", "hybrid", "colbert"):
        session = getattr(engine, f"{role}_encoder").session
        monkeypatch.setattr(session, "run", lambda *a, _run=session.run, _role=role, **k: (runs.append(_role),
                                                                                            _run(*a, **k))[1])
    queries = list(p.collection.split_queries("test").values())
    for text in queries:
        runs.clear()
        body = {"query": text, "k": DEPTH, "candidates": DEPTH, "first_stage": "hybrid", "rerank": "colbert"}
        got = client.post("/search", json=body)
        assert got.status_code == 200, got.text
        assert runs == ["hybrid"], runs  # one transformer pass
        (states,) = p.query_token_states([text], source=HYBRID_HEAD)
        tokens = project_query_tokens(states[None], np.ones((1, len(states))), head_map)
        [(hits, _)] = engine.retrieve([text], opts, dense=p.hybrid_queries([text]), colbert=tokens)
        assert [h["id"] for h in got.json()["hits"]] == [h.id for h in hits]
        np.testing.assert_allclose([h["score"] for h in got.json()["hits"]], [h.score for h in hits], atol=1e-4)
    # the builder's row scores the same tokens; the student's pass gives its -2pass neighbour another
    hw = tune_hybrid(p, p.cfg.evaluate.rerank_depth)["dense_weight"]
    depth = p.cfg.evaluate.rerank_depth
    lists = p.first_stage_lists(queries, p.dense_queries(queries), hw, depth, stages=("hybrid",),
                                hybrid_queries=p.hybrid_queries(queries))["hybrid"]
    from index_build.metrics import metrics
    from index_build.tune import tune_rerank_weights

    weight = tune_rerank_weights(p, "colbert", hw, depth)["weights"]["hybrid"]
    qids = list(p.collection.split_queries("test"))
    cb = p.colbert_scores(queries, lists, source=HYBRID_HEAD)
    assert metrics(p.collection.qrels["test"], p.run_of(qids, lists, cb, weight))["nDCG@10"] == pytest.approx(
        result["systems"]["hybrid+colbert"]["nDCG@10"], abs=1e-4)


def test_auto_serves_the_closer_copy_of_the_teachers_query_vectors(ridge_built, tmp_path):
    """"auto" measures each head's weighted mean cosine to the teacher's query vectors on the
    dev slice through the exported graphs and picks the higher (the trained student on a tie);
    with the student, the artifact has no hybrid model."""
    from index_build.asymmetric import mean_cosine
    from index_build.distill import hybrid_head_stage

    p, _ = ridge_built
    auto = Pipeline(load_config(overrides=[*p.cfg.overrides[:-1]]), progress=False)
    assert auto.cfg.asymmetric.hybrid_head == "auto"
    record = hybrid_head_stage(auto, tmp_path)
    dev = auto.load_mined()["dev"]
    teacher = auto.teacher_space.query_vectors(dev["queries"])
    from models.encoders import DenseEncoder

    mine = {"ridge": DenseEncoder(tmp_path / "onnx", threads=1).encode_queries(dev["queries"]),
            "student": auto.dense_queries(dev["queries"], "asymmetric")}
    expected = {k: mean_cosine(v, teacher) for k, v in mine.items()}  # one part: the plain mean cosine
    assert record["dev_cosine"] == pytest.approx(expected, abs=1e-4)
    assert record["serves_hybrid"] == ("ridge" if expected["ridge"] > expected["student"] else "student")
    student = Pipeline(load_config(overrides=[*p.cfg.overrides[:-1], 'asymmetric.hybrid_head="student"',
                                              f'artifact_dir="{tmp_path}/artifact"']), progress=False)
    assert student.hybrid_head() is None and student.hybrid_queries(["a query"]) is None


def test_pool_colbert_rows_take_the_query_tokens_as_served(ridge_built, tmp_path):
    """On a TREC pool, ColBERT's MaxSim per query side (the hybrid head's pass, the student's,
    ColBERT's own query encoder) is the collection path's for the same candidates: the pool's
    corpus is the build's, its documents encoded on the fly rather than read from the cache."""
    from index_build.context import HYBRID_HEAD
    from index_build.evaluate import TrecPool, _pool_colbert_runs, evaluate_trec
    from tests.tiny import write_trec_pool

    p, _ = ridge_built
    path = write_trec_pool(tmp_path)
    pool = TrecPool.load(path, 20)
    sides = {HYBRID_HEAD, "asymmetric", "colbert"}
    runs = _pool_colbert_runs(p, pool, sides)
    index = {d.id: i for i, d in enumerate(p.collection.docs)}
    lists = [(np.array([index[c] for c in cs], np.int64), np.zeros(len(cs))) for cs in pool.candidates]
    expected = {side: p.colbert_scores(pool.texts, lists, source=side) for side in sorted(sides)}
    for side, scores in expected.items():
        for r, (qid, cs) in enumerate(zip(pool.qids, pool.candidates)):
            np.testing.assert_allclose([runs[side][qid][c] for c in cs], scores[r], rtol=1e-4, atol=1e-4)
    # three different query sides
    assert not np.allclose(expected[HYBRID_HEAD][0], expected["asymmetric"][0])
    assert not np.allclose(expected[HYBRID_HEAD][0], expected["colbert"][0])
    systems = evaluate_trec(p, path)
    assert {"dense+colbert", "hybrid+colbert", "dense+colbert-2pass", "hybrid+colbert-2pass"} <= set(systems)
    p.trec_weights.clear()
