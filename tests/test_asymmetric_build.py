"""A tiny asymmetric build end to end: the pipeline distills the query-only student into the
teacher's document space, evaluates it beside the full-tower student, packages it as the
artifact's dense model over the teacher members' document vectors, and the service serves
it, in the default mode the builder chose on its dev slice, ranking as the builder does."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from fastapi.testclient import TestClient  # noqa: E402

from index_build.config import hashed_section, load_config  # noqa: E402
from index_build.distill import asymmetric_training_texts  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402
from index_build.tune import choose_default, mode_row, tune_hybrid  # noqa: E402
from service.app import create_app  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.service_fixtures import make_settings, wait_ready  # noqa: E402
from tests.tiny import write_trec_pool  # noqa: E402

DEPTH = 20


@pytest.fixture(scope="module")
def built(tiny_beir, tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("asym-build")
    cfg = load_config(overrides=tiny_overrides(
        tiny_beir, tiny_bert, root, 'students.kinds=["dense","asymmetric","colbert"]',
        "train.dense.epochs=1", "train.colbert.epochs=1", "asymmetric.epochs=2", "asymmetric.batch=8",
        "asymmetric.eval_every=10", "asymmetric.pool_size=8", "asymmetric.pool_depth=10",
        "evaluate.rerank_depth=20"))
    p = Pipeline(cfg, progress=False)
    return p, p.run_all()


@pytest.fixture(scope="module")
def client(built) -> Iterator[TestClient]:
    p, _ = built
    with TestClient(create_app(make_settings(p.cfg.artifact_dir))) as c:
        wait_ready(c)
        yield c


def test_asymmetric_rows_beside_the_full_tower_rows(built):
    p, result = built
    systems = result["systems"]
    assert {"dense", "hybrid", "asym-dense", "asym-hybrid", "asym-dense-int8-query", "dense+colbert",
            "hybrid+colbert", "served-default", "teacher-space-hybrid"} <= set(systems)
    default = choose_default(p)
    assert systems["served-default"] == systems[mode_row(p, default)]
    # real dev queries: BM25 alone is a candidate (only pseudo-queries favour it by construction)
    assert "sparse+none" in default["dev_nDCG@10"] and "not_candidates" not in default
    # the teacher's own query vectors in its space; its one bi-encoder member is the base model here
    assert systems["teacher-space"] == pytest.approx(systems["base-dense"], abs=1e-4)
    record = result["stages"]["distill-asymmetric"]
    # every mined training query plus the corpus's pseudo-queries, none of them a dev query
    assert record["queries"] > record["mined"] and record["pseudo"] > 0
    assert record["space"]["dims"] == [32] and record["dev_history"][0]["step"] == 0
    dev = p.load_mined()["dev"]
    texts, draws, _, _ = asymmetric_training_texts(p, dev)
    assert not set(texts) & set(dev["queries"])
    assert not set(texts) & set(p.collection.split_queries("test").values())
    assert len(set(texts)) == len(texts) == len(draws) and (draws == 1).all()


def test_a_pool_of_another_collection_is_served_as_a_build_of_its_corpus(built, tmp_path, monkeypatch):
    """On a TREC pool the build was not trained on, the hybrid rows fuse BM25 and the teacher
    space over the pool's own corpus (the pool's teacher's BM25 member and bi-encoder
    vectors); this pool's corpus is the build's, so they rank as the build's own indexes do."""
    import index_build.evaluate as ev

    p, _ = built
    pool = write_trec_pool(tmp_path)
    systems = ev.evaluate_trec(p, pool)
    assert {"asym-dense", "asym-hybrid", "asym-hybrid-lists", "hybrid", "hybrid+colbert", "served-default"} <= set(
        systems)
    assert systems["served-default"] == systems[mode_row(p, choose_default(p))]
    monkeypatch.setattr(ev.PoolIndex, "of_pool", classmethod(lambda cls, pool, teacher: cls.of_build(p)))
    own = ev.evaluate_trec(p, pool)
    for row in ("asym-hybrid", "asym-hybrid-lists", "hybrid", "hybrid+colbert", "served-default"):
        assert systems[row] == pytest.approx(own[row], abs=1e-6), row
    p.trec_weights.clear()


def test_a_query_cap_keeps_every_mined_query_and_mined_draws_weights_them(built):
    """``asymmetric.max_queries`` trims the document pseudo-queries, never the mined queries
    (the real training queries here); ``asymmetric.mined_draws`` draws each of those that
    many times per pass."""
    p, _ = built
    dev = p.load_mined()["dev"]
    texts, _, about, _ = asymmetric_training_texts(p, dev)
    mined = {e.query for e in p.load_mined()["examples"]} - set(dev["queries"])
    assert mined and about["mined"] == len(mined) and about["pseudo"] == len(texts) - len(mined)
    cap = len(mined) + 3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(p.cfg.asymmetric, "max_queries", cap)
        mp.setattr(p.cfg.asymmetric, "mined_draws", 3)
        capped, draws, capped_about, _ = asymmetric_training_texts(p, dev)
    assert len(capped) == cap and mined <= set(capped) and capped_about["pseudo"] == 3
    assert {t: int(d) for t, d in zip(capped, draws)} == {t: 3 if t in mined else 1 for t in capped}
    with pytest.MonkeyPatch.context() as mp:  # more queries per document when asked for
        mp.setattr(p.cfg.asymmetric, "keyphrases_per_doc", 2)
        mp.setattr(p.cfg.asymmetric, "pseudo_per_doc", 10)
        _, _, more, _ = asymmetric_training_texts(p, dev)
    assert more["pseudo"] > about["pseudo"] + 3


def test_kl_target_dense_trains_against_the_teachers_bi_encoder_members(built, monkeypatch, tmp_path):
    """``asymmetric.kl_target = "dense"``: the listwise KL's targets are the teacher's
    members' scores without its BM25 term (:func:`index_build.asymmetric.member_scores`)."""
    import index_build.asymmetric as asym
    from index_build.distill import distill_asymmetric

    p, _ = built
    seen: dict[str, list] = {}

    def capture(student, texts, q_teacher, pools, t_scores, *args, **kwargs):
        seen[p.cfg.asymmetric.kl_target] = [texts, pools, t_scores]
        raise StopIteration

    monkeypatch.setattr(asym, "train_asymmetric", capture)
    for target in ("teacher", "dense"):
        monkeypatch.setattr(p.cfg.asymmetric, "kl_target", target)
        with pytest.raises(StopIteration):
            distill_asymmetric(p, tmp_path)
    texts, pools, dense = seen["dense"]
    assert all(np.array_equal(a, b) for a, b in zip(pools, seen["teacher"][1]))  # the same candidates
    space = p.teacher_space
    expected = asym.member_scores(space.query_parts(texts), space.doc_parts(), pools, [1.0] * len(space.members))
    for got, want in zip(dense, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(dense, seen["teacher"][2]))  # BM25 left out


def test_head_capacity_benchmark_reads_the_build(built):
    """benchmarks/asym_head.py on the tiny build: its ``trained`` head is the exported student
    (the build's asym-dense row), its ``teacher`` head the teacher's own query vectors (the
    teacher-space row)."""
    from benchmarks.asym_head import measure

    p, result = built
    entry = measure(p, max_train=300, epochs=5)
    heads, systems = entry["heads"], result["systems"]
    assert set(heads) == {"trained", "ridge-last", "ridge-layers", "mlp-layers", "teacher"}
    assert heads["trained"]["dense nDCG@10"] == systems["asym-dense"]["nDCG@10"]
    assert heads["teacher"]["dense nDCG@10"] == systems["teacher-space"]["nDCG@10"]
    assert heads["teacher"]["cos part 0 test"] == 1.0 and heads["trained"]["cos part 0 test"] < 1.0
    assert entry["train_queries"] <= 300 and entry["protocol"] == "full-corpus retrieval"


def test_kl_targets_benchmark_reads_the_build(built):
    """benchmarks/kl_targets.py on the tiny (labelled) build: its training queries are real
    (no source document), the document pseudo-queries grouped by generator, each with its source."""
    from benchmarks.kl_targets import measure

    p, _ = built
    entry = measure(p)
    groups = entry["groups"]
    assert {"training (real queries)", "title", "real (train split)"} <= set(groups)
    assert "source_first" in groups["title"] and "source_first" not in groups["training (real queries)"]
    assert 0 < groups["title"]["top1_mass"] <= 1 and groups["title"]["effective_candidates"] >= 1
    assert set(entry["groups_without_source"]) == {n for n, g in groups.items() if "source_first" in g}
    assert entry["temperature"] > 0 and set(entry["groups_at_temperature"]) == set(entry["groups_without_source"])


def test_kl_target_and_pseudo_kl_are_checked(tiny_beir, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="kl_target must be one of teacher, dense"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'asymmetric.kl_target="bm25"'))
    with pytest.raises(ValueError, match="pseudo_kl_pool must be one of full, without-source"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'asymmetric.pseudo_kl_pool="rest"'))
    with pytest.raises(ValueError, match="pseudo_kl_temperature must be > 0"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "asymmetric.pseudo_kl_temperature=0"))
    default = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path))
    rest = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path,
                                                'asymmetric.pseudo_kl_pool="without-source"'))
    assert "pseudo_kl" not in json.dumps(hashed_section(default.asymmetric))  # earlier builds stay cached
    assert rest.section_hash("asymmetric") != default.section_hash("asymmetric")


def test_asymmetric_head_is_checked_and_keyed_only_when_not_the_default(tiny_beir, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="head must be one of linear, layers-mlp"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'asymmetric.head="deep"'))
    default = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path))
    explicit = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'asymmetric.head="linear"'))
    mlp = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'asymmetric.head="layers-mlp"'))
    # a field added with its old behaviour as default leaves the stages cached before it valid
    assert default.section_hash("asymmetric") == explicit.section_hash("asymmetric")
    assert mlp.section_hash("asymmetric") != default.section_hash("asymmetric")
    assert "head" not in json.dumps(hashed_section(default.asymmetric))


def test_artifact_serves_the_asymmetric_student_over_the_teacher_space(built):
    p, _ = built
    manifest = json.loads((Path(p.cfg.artifact_dir) / "manifest.json").read_text())
    dense = manifest["models"]["dense"]
    assert dense["extra"]["asymmetric"]["dims"] == [32] and dense["dim"] == 32
    assert manifest["indexes"]["dense"]["dim"] == 32
    assert manifest["serving"]["dense_model"] == "asymmetric"
    assert manifest["serving"]["default"] == choose_default(p)
    assert manifest["training"]["students"]["asymmetric"]["queries"] > 0
    # the index holds the teacher member's document vectors, not the student's
    from models.dense_index import DenseIndex

    index = DenseIndex.load(Path(p.cfg.artifact_dir) / "dense" / "index.faiss")
    teacher_docs = p.teacher_space.doc_vectors()
    np.testing.assert_allclose(index.index.reconstruct_n(0, 5), teacher_docs[:5], atol=1e-5)


def test_the_hybrid_is_the_teachers_fusion_at_the_students_query_cost(built):
    """The asymmetric student's hybrid scores every candidate by BM25 and by each part of the
    teacher's space and sums their z-scores at the teacher's weights: fed the teacher's own
    query vector instead of the student's, it gives the teacher's ensemble scores over the
    same candidates (up to the ensemble's unnormalized weight sum)."""
    from index_build.teachers import cached_teacher_scores
    from models.retrieval import fuse_signals

    p, _ = built
    fusion, teacher = p.teacher_fusion, p.teacher
    assert fusion["record"]["dims"] == [32] and fusion["dense_share"] == 0.5  # BM25 + one bi-encoder
    queries = list(p.collection.split_queries("test").values())[:4]
    pools, _ = p.candidate_pools(queries, 10)
    expected = cached_teacher_scores(teacher, p.cache, queries, pools, progress=False)
    tq = p.teacher_space.query_vectors(queries)
    share, docs = fusion["dense_share"], p.corpus_vectors("asymmetric")
    for r, (q, pool) in enumerate(zip(queries, pools)):
        signals = [*fusion["parts"].scores(tq[r], docs[pool]), p.bm25.scores(q)[pool]]
        fused = fuse_signals(pool, signals, [share * w for w in fusion["parts"].weights] + [1 - share], len(pool))
        got = dict(zip(fused.indices.tolist(), fused.scores * sum(teacher.weights)))
        np.testing.assert_allclose([got[int(d)] for d in pool], expected[r], rtol=1e-4, atol=1e-4)


def test_the_hybrids_dense_parts_are_in_the_manifest(built, client):
    p, _ = built
    manifest = json.loads((Path(p.cfg.artifact_dir) / "manifest.json").read_text())
    hybrid = manifest["indexes"]["hybrid"]
    assert hybrid["dense_parts"]["dims"] == [32] and hybrid["dense_parts"]["weights"] == [1.0]
    assert hybrid["dense_weight"] == tune_hybrid(p)["dense_weight"]
    assert "toward the prior (0.5)" in hybrid["selection"]
    assert client.get("/info").json()["hybrid_weights"]["dense_parts"] == [1.0]


def test_service_ranks_as_the_builder_evaluates(built, client):
    p, _ = built
    queries = list(p.collection.split_queries("test").values())
    hw = tune_hybrid(p)["dense_weight"]
    firsts = p.first_stage_lists(queries, p.dense_queries(queries), hw, DEPTH)
    doc_ids = p.collection.doc_ids
    for stage in ("dense", "hybrid"):
        for r, text in enumerate(queries):
            body = {"query": text, "k": DEPTH, "candidates": DEPTH, "first_stage": stage, "rerank": "none"}
            hits = client.post("/search", json=body).json()["hits"]
            cands, scores = firsts[stage][r]
            assert [h["id"] for h in hits] == [doc_ids[int(j)] for j in cands], (stage, text)
            np.testing.assert_allclose([h["score"] for h in hits], scores, rtol=1e-4, atol=1e-4)
    info = client.get("/info").json()
    default = choose_default(p)
    assert info["default_mode"]["first_stage"] == default["first_stage"]
    assert info["default_mode"]["rerank"] == default["rerank"]
    got = client.post("/search", json={"query": queries[0]}).json()
    assert (got["first_stage"], got["rerank"]) == (default["first_stage"], default["rerank"])


def test_colbert_rerank_runs_one_query_pass(built, client, monkeypatch):
    """rerank=colbert takes ColBERT's query tokens from the asymmetric encoder's pass: the
    artifact carries the fitted map, the service runs no ColBERT query encoder, and it ranks
    as the builder's one-pass rows score."""
    p, result = built
    manifest = json.loads((Path(p.cfg.artifact_dir) / "manifest.json").read_text())
    entry = manifest["models"]["colbert"]["query_token_map"]
    assert entry["from"] == "dense" and 0.0 < entry["token_cosine"] <= 1.0
    token_map = np.load(Path(p.cfg.artifact_dir) / "models" / "colbert" / entry["file"])
    np.testing.assert_allclose(token_map, p.query_token_map()["map"], atol=1e-6)
    assert {"dense+colbert-2pass", "hybrid+colbert-2pass"} <= set(result["systems"])
    state = client.app.state.service
    engine = state.engine
    assert engine.one_pass and client.get("/info").json()["models"]["colbert"]["query_tokens"] == "dense pass"
    colbert_runs = []
    monkeypatch.setattr(engine.colbert_encoder.session, "run", lambda *a, **k: colbert_runs.append(1))
    # the builder's one-pass query tokens (its own encoder and fitted map), reranked by the
    # service's engine, rank as the service's /search does with the tokens it projects itself
    from models.encoders import project_query_tokens

    queries = list(p.collection.split_queries("test").values())
    opts = engine.resolve_options(k=DEPTH, candidates=DEPTH, rerank="colbert", first_stage="dense")
    for text in queries:
        body = {"query": text, "k": DEPTH, "candidates": DEPTH, "first_stage": "dense", "rerank": "colbert"}
        got = client.post("/search", json=body)
        assert got.status_code == 200, got.text
        (states,) = p.query_token_states([text])
        tokens = project_query_tokens(states[None], np.ones((1, len(states))), p.query_token_map()["map"])
        [(hits, _)] = engine.retrieve([text], opts, dense=p.dense_queries([text]), colbert=tokens)
        assert [h["id"] for h in got.json()["hits"]] == [h.id for h in hits]
        np.testing.assert_allclose([h["score"] for h in got.json()["hits"]], [h.score for h in hits], atol=1e-4)
    assert colbert_runs == []


def test_two_pass_when_one_pass_is_off(built):
    from service.search import SearchEngine

    p, _ = built
    engine = SearchEngine.load(p.cfg.artifact_dir, make_settings(p.cfg.artifact_dir, one_pass=False))
    try:
        assert not engine.one_pass
        opts = engine.resolve_options(k=5, rerank="colbert", first_stage="dense")
        assert engine.encoders_needed(opts) == ("dense", "colbert")
        assert engine.search(list(p.collection.split_queries("test").values())[0], k=5, rerank="colbert").hits
    finally:
        engine.close()


def test_latency_reference_times_one_pass_against_two(built):
    from benchmarks.latency import query_token_passes
    from models.artifacts import load_manifest

    p, _ = built
    root = Path(p.cfg.artifact_dir)
    manifest = load_manifest(root)
    texts = list(p.collection.split_queries("test").values())
    out = query_token_passes(root, manifest.models["dense"], manifest.models["colbert"], texts, threads=1, repeats=1)
    assert out["one-pass"]["p50_ms"] > 0 and out["two-pass"]["p50_ms"] > 0
    assert out["one_pass_over_two_pass_p50"] == pytest.approx(out["one-pass"]["p50_ms"] / out["two-pass"]["p50_ms"],
                                                            rel=0.01)


def test_student_encoders_open_once_and_again_after_a_rewrite(built):
    from models.encoders import ColbertEncoder, DenseEncoder

    p, _ = built
    first = p.student_encoder(DenseEncoder, "asymmetric")
    assert p.student_encoder(DenseEncoder, "asymmetric") is first
    assert p.student_encoder(ColbertEncoder, "colbert") is not first
    graph = p.onnx_dir("asymmetric") / "model.onnx"
    st = graph.stat()
    try:
        os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # as an export rewriting it
        again = p.student_encoder(DenseEncoder, "asymmetric")
        assert again is not first
        texts = ["a query"]
        np.testing.assert_allclose(again.encode_queries(texts), first.encode_queries(texts), atol=1e-6)
    finally:
        os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_checkpoint_is_checked(tiny_beir, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="checkpoint must be one of best, average"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'asymmetric.checkpoint="last"'))


def test_checkpoint_benchmark_retrains_the_build_student_and_applies_each_rule(built):
    """benchmarks/asym_checkpoints.py on the tiny build: the retrained student's dev scores are
    the build's own, its ``best`` row is the build's asym-dense row, and the build's stage is
    left as it was."""
    from benchmarks.asym_checkpoints import WISE_FT, measure

    p, result = built
    student = p.work / "distill-asymmetric" / "student"
    before = {f.name: f.stat().st_mtime_ns for f in student.rglob("*")}
    entry = measure(p)
    stage = json.loads((p.work / "distill-asymmetric" / "stage.json").read_text())["result"]
    checks, kept = entry["checks"], entry["kept"]
    assert [c["step"] for c in checks] == [h["step"] for h in stage["dev_history"]]
    assert [c["dev_nDCG@10"] for c in checks] == [h["dev_nDCG@10"] for h in stage["dev_history"]]
    assert kept["best"]["steps"] == [stage["best_step"]] and kept["last"]["steps"] == [stage["steps"]]
    assert kept["best"]["dense"] == pytest.approx(result["systems"]["asym-dense"]["nDCG@10"], abs=1e-4)
    assert kept["average"]["steps"] == [c["step"] for c in checks if c["step"] > 0 and 2 * c["step"] >= entry["steps"]]
    assert {f"wise-ft {a}" for a in WISE_FT} <= set(kept) and p.cfg.asymmetric.checkpoint == "best"
    assert {f.name: f.stat().st_mtime_ns for f in student.rglob("*")} == before


def test_the_torch_baseline_serves_the_builds_asymmetric_query_encoder(built, client):
    """The load test's baseline serves what the artifact serves as its dense model: the torch
    asymmetric student over the teacher's document vectors (exact search), so its dense
    answers score every hit as the service does (IVF-PQ aside, which a tiny corpus searches
    exhaustively)."""
    from benchmarks.baseline_service import create_baseline_app

    p, _ = built
    assert p.served_dense == "asymmetric"
    engine = client.app.state.service.engine
    app = create_baseline_app(None, p.cfg.overrides, threads=1)
    with TestClient(app) as baseline:
        assert app.state.engine.index.d == engine.dense_index.dim == p.teacher_space.doc_vectors().shape[1]
        for text in list(p.collection.split_queries("test").values())[:5]:
            body = {"query": text, "k": 5, "rerank": "none", "candidates": 20}
            got = baseline.post("/search", json=body)
            assert got.status_code == 200, got.text
            served = {h["id"]: h["score"] for h in client.post(
                "/search", json={**body, "first_stage": "dense", "k": 20}).json()["hits"]}
            hits = got.json()["hits"]
            assert [served.get(h["id"]) for h in hits] == pytest.approx([h["score"] for h in hits], abs=1e-3)
