"""The whole offline pipeline on the tiny corpus and model: stages, caching, results."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import index_build.distill  # noqa: E402
import index_build.evaluate  # noqa: E402
import index_build.tune  # noqa: E402
from index_build.config import load_config  # noqa: E402
from index_build.distill import base_dense_dev_score, dev_evaluator  # noqa: E402
from index_build.evaluate import evaluate_collection, evaluate_trec  # noqa: E402
from index_build.stages import Pipeline  # noqa: E402
from index_build.tune import choose_default, mode_row, rerank_scores, tune_hybrid, tune_rerank_weights  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.tiny import write_trec_pool  # noqa: E402

SYSTEMS = {"bm25", "teacher", "base-dense", "dense", "dense-int8", "dense-int8-query", "dense+colbert",
           "dense+colbert-int8-query", "dense+colbert-maxsim", "dense+cross-encoder", "dense+cross-encoder-plain",
           "dense+cross-encoder-int8",
           "hybrid", "hybrid+colbert", "hybrid+colbert-maxsim"}


def fixed_weights(w: float):
    """A stand-in for :func:`index_build.tune.tune_rerank_weights` that gives every first stage weight ``w``."""
    return lambda *a, **k: {"weights": dict.fromkeys(("dense", "sparse", "hybrid"), w)}


@pytest.fixture(scope="module")
def built(tiny_beir, tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, root, "train.dense.epochs=2"))
    p = Pipeline(cfg, progress=False)
    result = p.run_all()
    return root, cfg, p, result


def test_results_file_has_every_system(built, tiny_beir):
    root, _, p, result = built
    assert SYSTEMS <= set(result["systems"])
    saved = json.loads((root / "results" / f"{tiny_beir.name}.json").read_text())
    assert saved["systems"] == result["systems"]
    for m in saved["systems"].values():
        assert set(m) == {"nDCG@10", "RR@10", "R@100"}
        assert all(0.0 <= v <= 1.0 for v in m.values())
    assert {"mine", "distill-dense", "export-dense", "evaluate"} <= set(saved["stages"])
    assert all(s["seconds"] >= 0 and s["peak_rss_bytes"] > 0 for s in saved["stages"].values())
    assert (root / "results" / f"{tiny_beir.name}.md").read_text().startswith("###")
    # the command that rebuilds it, overrides included (shell-quoted), and it parses back
    import shlex

    args = shlex.split(saved["command"])
    assert args[:2] == ["index-build", "all"] and "--config" not in args
    assert [a for i, a in enumerate(args) if i > 0 and args[i - 1] == "--set"] == p.cfg.overrides
    assert "train.dense.epochs=2" in p.cfg.overrides


def test_results_have_each_rows_ndcg_per_test_query(built, tiny_beir):
    """``<name>.per-query.json``: every row's nDCG@10 on each judged test query, whose mean is
    the row's nDCG@10 (the served-default row's are its mode's)."""
    root, _, p, result = built
    saved = json.loads((root / "results" / f"{tiny_beir.name}.per-query.json").read_text())
    assert saved["metric"] == "nDCG@10" and saved["mode"] == "retrieval" and saved["command"]
    rows = saved["collection"]
    assert set(rows) == set(result["systems"])
    judged = set(p.collection.qrels[p.cfg.data.test_split])
    for name, per_query in rows.items():
        assert set(per_query) == judged
        assert result["systems"][name]["nDCG@10"] == pytest.approx(np.mean(list(per_query.values())), abs=1e-4)
    assert rows["served-default"] == rows[mode_row(p, choose_default(p))]


def test_int8_corpus_rows_are_optional(built, tiny_beir, tiny_bert, tmp_path):
    """``evaluate.int8_corpus=false`` drops the rows whose corpus is encoded by the int8 graphs
    (no int8 corpus pass), keeps every other row with its value (the int8-query rows are what
    the service serves) and changes only the evaluate stage's key."""
    import shutil

    root, _, p, result = built
    copy = tmp_path / "copy"
    shutil.copytree(root / "work", copy / "work")
    shutil.copy(root / "cache.sqlite", copy / "cache.sqlite")
    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, copy, "train.dense.epochs=2",
                                               "evaluate.int8_corpus=false"))
    q = Pipeline(cfg, progress=False)
    assert q.evaluate_key() != p.evaluate_key()
    encoded = []
    real = q.dense_corpus
    q.dense_corpus = lambda f="model.onnx": encoded.append(f) or real(f)  # type: ignore[method-assign]
    got = q.run_all()["systems"]
    ran = {n for n, r in q.records.items() if not r.cached}
    assert ran == {"evaluate", "artifact"}  # (the artifact's key names its own directory)
    assert set(encoded) == {"model.onnx"}
    dropped = {"dense-int8", "dense+colbert-int8"}
    assert set(got) == set(result["systems"]) - dropped
    assert {"dense-int8-query", "dense+colbert-int8-query"} <= set(got)
    assert all(got[k] == pytest.approx(v) for k, v in result["systems"].items() if k not in dropped)


def test_export_parity_recorded(built):
    _, _, p, _ = built
    for kind in ["dense", "colbert", "cross-encoder"]:
        assert p.records[f"export-{kind}"].result["parity_max_abs_diff"] <= 1e-4


def test_rerun_is_cached_and_change_redoes_only_downstream(built, tiny_beir, tiny_bert):
    root, cfg, _, _ = built
    again = Pipeline(cfg, progress=False)
    again.run_all()
    assert all(r.cached for r in again.records.values())
    changed = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, root, "train.dense.epochs=2",
                                                   "train.colbert.lr=3e-5"))
    p3 = Pipeline(changed, progress=False)
    p3.run_all()
    ran = {n for n, r in p3.records.items() if not r.cached}
    assert ran == {"distill-colbert", "export-colbert", "evaluate", "artifact"}


def test_adding_a_student_keeps_the_mined_examples_and_the_other_students(built, tiny_beir, tiny_bert):
    root, cfg, p, _ = built
    fewer = Pipeline(load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, root, "train.dense.epochs=2",
                                                          'students.kinds=["dense"]')), progress=False)
    assert fewer.mine_key() == p.mine_key() and fewer.distill_key("dense") == p.distill_key("dense")
    deeper = Pipeline(load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, root, "train.dense.epochs=2",
                                                           "students.neg_depth=7")), progress=False)
    assert deeper.mine_key() != p.mine_key()


def test_artifact_is_verified_and_complete(built):
    from models.artifacts import verify
    from models.dense_index import DenseIndex
    from models.docstore import DocStore
    from models.token_index import TokenIndex

    root, cfg, p, _ = built
    art = root / "artifacts"
    m = verify(art)
    assert m.corpus.n_docs == 60 and set(m.models) == {"dense", "colbert", "cross-encoder"}
    assert {"dense", "colbert", "bm25"} <= set(m.indexes)
    assert DenseIndex.load(art / m.indexes["dense"]["path"]).ntotal == 60
    assert TokenIndex.load(art / m.indexes["colbert"]["path"]).n_docs == 60
    with DocStore.open(art / m.docstore["path"]) as ds:
        assert ds.ids == p.collection.doc_ids
    assert m.training["label_free"] is False
    assert m.build["stages"]["distill-dense"]["seconds"] >= 0


def test_verify_cli(built):
    from typer.testing import CliRunner

    from index_build.cli import app

    root = built[0]
    res = CliRunner().invoke(app, ["verify", str(root / "artifacts")])
    assert res.exit_code == 0 and "ok:" in res.output
    res = CliRunner().invoke(app, ["verify", str(root / "nowhere")])
    assert res.exit_code == 1


def test_stage_clis_do_what_they_say(built, tiny_beir, tiny_bert):
    """``evaluate`` evaluates and writes results (cached stages: nothing retrains); ``artifact``
    packages without evaluating, and refuses a config that turns artifacts off."""
    from typer.testing import CliRunner

    from index_build.cli import app

    root = built[0]
    sets = [x for o in tiny_overrides(tiny_beir, tiny_bert, root, "train.dense.epochs=2") for x in ("--set", o)]
    res = CliRunner().invoke(app, ["evaluate", *sets])
    assert res.exit_code == 0, res.output
    assert SYSTEMS <= set(json.loads(res.output[res.output.index("{"):]))
    res = CliRunner().invoke(app, ["artifact", *sets])
    assert res.exit_code == 0, res.output
    assert '"artifact_version"' in res.output
    res = CliRunner().invoke(app, ["artifact", *sets, "--set", "build_artifact=false"])
    assert res.exit_code == 2 and "build_artifact = false" in res.output


def test_training_loss_falls(tiny_beir, tiny_bert, tmp_path):
    """Margin-MSE on a toy problem: the loss falls as the dense student learns the teacher."""
    import numpy as np

    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "train.dense.epochs=12",
                                               "train.dense.lr=1e-3", "train.dense.warmup=0.0",
                                               'students.kinds=["dense"]'))
    p = Pipeline(cfg, progress=False)
    p.mine()
    res = p.distill("dense").result
    log = json.loads((tmp_path / "work" / "train-dense" / "train_log.json").read_text())["loss_history"]
    first, last = np.mean(log[:5]), np.mean(log[-5:])
    assert last < 0.5 * first, (first, last)
    assert res["steps"] == len(log)


def test_training_resumes_from_checkpoint(tiny_beir, tiny_bert, tmp_path):
    from index_build.students import new_student
    from index_build.train import TrainConfig, train

    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path))
    p = Pipeline(cfg, progress=False)
    p.mine()
    examples = p.load_mined()["examples"]
    tcfg = TrainConfig(epochs=2, checkpoint_every=2, batch_queries=4)
    full = train(new_student("dense", tiny_bert, max_doc_len=64), examples, p.corpus_texts, tcfg,
                 tmp_path / "a", progress=False)
    # an interrupted run (stopped after 3 steps) resumes from its checkpoint and ends identical
    part = train(new_student("dense", tiny_bert, max_doc_len=64), examples, p.corpus_texts, tcfg,
                 tmp_path / "b", progress=False, stop_after=3)
    assert part.steps == 3
    resumed = train(new_student("dense", tiny_bert, max_doc_len=64), examples, p.corpus_texts, tcfg,
                    tmp_path / "b", progress=False)
    assert resumed.steps == full.steps
    assert resumed.loss_history[:3] == part.loss_history
    assert resumed.loss_history == pytest.approx(full.loss_history, rel=1e-3)


def test_trec_pool_rows_of_a_build_trained_elsewhere_are_as_served(built, tmp_path):
    """A labelled build reranking a TREC DL pool: ColBERT and the cross-encoder are interpolated
    with the dense student's scores at the build's dev-slice weights (what its artifact serves);
    ``-maxsim`` / ``-plain`` are the rerankers alone."""
    _, _, p, _ = built
    pool = write_trec_pool(tmp_path)
    p.trec_weights.clear()
    systems = evaluate_trec(p, pool)
    assert {"bm25", "base-dense", "teacher", "dense", "hybrid", "dense+colbert", "hybrid+colbert",
            "dense+colbert-maxsim", "dense+cross-encoder", "dense+cross-encoder-plain",
            "served-default"} <= set(systems)
    assert systems["served-default"] == systems[mode_row(p, choose_default(p))]
    hw = tune_hybrid(p)["dense_weight"]
    weights = p.trec_weights["pool"]
    assert weights["colbert_weight"] == tune_rerank_weights(p, "colbert", hw)["weights"]
    served_depth = p.cfg.evaluate.served_cross_encoder_depth  # the depth the artifact tunes and serves it at
    ce = tune_rerank_weights(p, "cross-encoder", hw, served_depth)
    assert weights["cross_encoder_weight"] == ce["weights"]["dense"]
    plain = {"dense+colbert": "dense+colbert-maxsim", "dense+cross-encoder": "dense+cross-encoder-plain"}
    for w, expect in [(1.0, plain), (0.0, {"dense+colbert": "dense", "dense+cross-encoder": "dense"})]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(index_build.evaluate, "tune_rerank_weights", fixed_weights(w))
            fixed = evaluate_trec(p, pool)
        for row, same_as in expect.items():
            assert fixed[row] == pytest.approx(systems[same_as]), (w, row)
    p.trec_weights.clear()


def test_pool_index_without_a_bm25_teacher_member_builds_one_over_the_pool(tmp_path):
    """A pool's BM25 is the teacher's member's index, or one built over the pool's passages
    with the service's settings when the teacher has none."""
    from types import SimpleNamespace

    from index_build.evaluate import PoolIndex, TrecPool
    from index_build.teachers import BM25Teacher
    from models.sparse_index import BM25Index

    pool = TrecPool.load(write_trec_pool(tmp_path), 20)
    texts = pool.collection.doc_texts()
    built = PoolIndex.of_pool(pool, SimpleNamespace(members=[]))
    q = pool.texts[0]
    assert np.allclose(built.bm25.scores(q), BM25Index.build(texts).scores(q))
    member = BM25Teacher(texts, pool.collection.checksum())
    assert PoolIndex.of_pool(pool, SimpleNamespace(members=[member])).bm25 is member.index
    assert built.doc_ids == pool.collection.doc_ids and built.doc_index == pool.collection.doc_index


def test_rerank_mode_on_a_trec_style_pool(tmp_path, tiny_bert):
    """Label-free distillation on a pool, then rerank its BM25 run (the TREC DL protocol)."""
    data = write_trec_pool(tmp_path)
    cfg = load_config(overrides=tiny_overrides(data, tiny_bert, tmp_path, "data.label_free=true",
                                               'evaluate.mode="rerank"', "evaluate.rerank_depth=20",
                                               'students.kinds=["dense", "colbert"]', "label_free.dev_queries=5"))
    p = Pipeline(cfg, progress=False)
    systems = p.run_all()["systems"]
    assert {"bm25", "base-dense", "teacher", "dense", "dense+colbert", "hybrid", "hybrid+colbert",
            "dense+colbert-maxsim"} <= set(systems)
    weights = p.records["evaluate"].result["weights"]["pool"]
    assert set(weights["colbert_weight"]) == {"dense", "sparse", "hybrid"} and 0 <= weights["hybrid_dense_weight"] <= 1
    # ColBERT is interpolated with each first stage by the dev-slice weights: at weight 1 it is
    # plain MaxSim reranking, at weight 0 the first stage's own ranking
    for w, expect in [(1.0, {"dense+colbert": "dense+colbert-maxsim", "hybrid+colbert": "dense+colbert-maxsim"}),
                      (0.0, {"dense+colbert": "dense", "hybrid+colbert": "hybrid"})]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(index_build.evaluate, "tune_rerank_weights", fixed_weights(w))
            fixed = evaluate_trec(p, data)
        for row, same_as in expect.items():
            assert fixed[row] == pytest.approx(systems[same_as]), (w, row)
    # the teacher row is the configured teacher: a lone member ranks as that member does
    p.cfg.teacher.members = [{"kind": "bi-encoder", "model": p.cfg.students.base}]
    assert evaluate_trec(p, data)["teacher"] == systems["base-dense"]
    p.cfg.teacher.members = [{"kind": "bm25"}]
    assert evaluate_trec(p, data)["teacher"] == systems["bm25"]


def test_rerank_mode_with_the_asymmetric_student(tmp_path, tiny_bert):
    """On a pool, the asymmetric student scores its candidates against the teacher members'
    document vectors; ``teacher-space`` is the teacher's own query vectors there (its one
    bi-encoder member is the base model here, so it ranks as ``base-dense``)."""
    data = write_trec_pool(tmp_path)
    cfg = load_config(overrides=tiny_overrides(data, tiny_bert, tmp_path, "data.label_free=true",
                                               'evaluate.mode="rerank"', "evaluate.rerank_depth=20",
                                               'students.kinds=["asymmetric"]', "label_free.dev_queries=5",
                                               "asymmetric.batch=8", "asymmetric.pool_size=8"))
    p = Pipeline(cfg, progress=False)
    systems = p.run_all()["systems"]
    assert {"asym-dense", "asym-hybrid", "asym-hybrid-lists", "teacher-space", "served-default"} <= set(systems)
    assert systems["teacher-space"] == pytest.approx(systems["base-dense"], abs=1e-4)
    # over the same candidates, the hybrid with the teacher's own query vectors is the teacher
    assert systems["teacher-space-hybrid"] == pytest.approx(systems["teacher"], abs=1e-4)
    # the hybrid is the teacher's fusion (BM25 and one bi-encoder, equal weights), kept on a label-free build
    from index_build.tune import tune_hybrid

    assert p.teacher_fusion["dense_share"] == 0.5 and tune_hybrid(p)["dense_weight"] == 0.5


def test_pseudo_query_augmentation_and_dev_retrieval(tiny_beir, tiny_bert, tmp_path):
    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "train.dense.pseudo_queries=20",
                                               "train.dense.dev_retrieval=true", 'students.kinds=["dense"]',
                                               "label_free.dev_queries=0"))
    p = Pipeline(cfg, progress=False)
    p.mine()
    n_labelled = p.records["mine"].result["examples"]
    res = p.distill("dense").result
    assert res["examples"] == n_labelled + p.records["pseudo-20"].result["examples"]
    assert p.records["pseudo-20"].result["pseudo_queries"] <= 20
    assert len(res["dev_history"]) >= 2  # full-corpus retrieval on the dev queries at start and end
    assert not p.records["pseudo-20"].cached
    # a rerun finds distill up to date: the pseudo-query stage's record still reaches the results
    again = Pipeline(cfg, progress=False)
    again.mine()
    again.distill("dense")
    assert again.records["distill-dense"].cached and again.records["pseudo-20"].cached
    assert again.records["pseudo-20"].seconds == p.records["pseudo-20"].seconds


def test_auto_teacher_scale_matches_the_students_margin_spread(tiny_beir, tiny_bert, tmp_path):
    import numpy as np

    from index_build.students import new_student
    from index_build.train import TrainConfig, calibrate_teacher_scale, train

    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path))
    p = Pipeline(cfg, progress=False)
    p.mine()
    examples = p.load_mined()["examples"]
    student = new_student("dense", tiny_bert, max_doc_len=64)
    tcfg = TrainConfig(epochs=0.5, batch_queries=4, teacher_scale="auto", calibration_batches=4)
    a = calibrate_teacher_scale(student, examples, p.corpus_texts, tcfg, 20.0)
    # the scale of a teacher multiplied by 10 is 10x smaller: the product is what training sees
    scaled = [dataclasses.replace(e, teacher=np.asarray(e.teacher) * 10.0) for e in examples]
    b = calibrate_teacher_scale(student, scaled, p.corpus_texts, tcfg, 20.0)
    assert a > 0 and b == pytest.approx(a / 10.0, rel=1e-4)
    res = train(student, examples, p.corpus_texts, tcfg, tmp_path / "auto", progress=False)
    saved = json.loads((tmp_path / "auto" / "train_log.json").read_text())
    assert saved["teacher_scale"] == pytest.approx(a, rel=1e-4) and res.steps >= 1


def test_distill_vq_step_trains_the_artifact_index(built, tiny_beir, tiny_bert):
    """``index.distill_vq.enabled`` re-learns the artifact's IVF-PQ and the manifest says so.
    (Last in this module: it moves the work dir's artifact stage to another directory.)"""
    from models.artifacts import verify
    from models.dense_index import DenseIndex

    root, _, _, _ = built
    cfg = load_config(overrides=tiny_overrides(
        tiny_beir, tiny_bert, root, "train.dense.epochs=2", f'artifact_dir="{root}/artifacts-dvq"',
        "index.factory=IVF4,PQ4x4", "index.distill_vq.enabled=true", "index.distill_vq.steps=5",
        'index.distill_vq.queries="pseudo"'))
    p = Pipeline(cfg, progress=False)
    p.run_all()
    assert not p.records["artifact"].cached
    assert all(p.records[n].cached for n in ("mine", "distill-dense", "export-dense"))
    m = verify(root / "artifacts-dvq")
    dense = m.indexes["dense"]
    trained = dense["trained_by"]
    assert trained["method"] == "distill-vq" and trained["steps"] == 5
    assert trained["queries"]["source"] == "pseudo" and trained["queries"]["n_queries"] > 0
    assert trained["settings"]["queries"] == "pseudo" and "enabled" not in trained["settings"]
    assert DenseIndex.load(root / "artifacts-dvq" / dense["path"]).ntotal == 60
    assert verify(root / "artifacts").indexes["dense"]["trained_by"] == {"method": "faiss"}


def test_distill_vq_settings_are_validated(tiny_beir, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="distill_vq.queries"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'index.distill_vq.queries="test"'))
    with pytest.raises(ValueError, match="distill_vq.steps"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "index.distill_vq.steps=0"))


def test_dev_judge_is_validated(tiny_beir, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="evaluate.dev_judge must be one of source, teacher"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'evaluate.dev_judge="oracle"'))


def test_codec_kmeans_iterations_are_validated_and_reach_the_artifact(built, tiny_beir, tiny_bert, tmp_path):
    root, cfg, p, _ = built
    with pytest.raises(ValueError, match="index.colbert_kmeans_niter must be at least 1"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "index.colbert_kmeans_niter=0"))
    manifest = json.loads((Path(cfg.artifact_dir) / "manifest.json").read_text())
    assert manifest["indexes"]["colbert"]["kmeans_niter"] == cfg.index.colbert_kmeans_niter == 4


def test_wise_ft_range_is_validated_at_load(tiny_beir, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match=r"train.dense.wise_ft must be in \[0, 1\]"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "train.dense.wise_ft=1.5"))


def test_cross_encoder_scores_are_cached_by_content(built, monkeypatch):
    _, _, p, _ = built
    queries = ["tumor growth", "vaccine response"]
    texts = [[p.corpus_texts[0], p.corpus_texts[1]], [p.corpus_texts[2]]]
    first = p.cross_encoder_scores(queries, texts)
    assert [s.shape for s in first] == [(2,), (1,)]

    class Refuse:
        def __init__(self, *a, **k):
            raise AssertionError("cached scores were recomputed")

    monkeypatch.setattr("models.encoders.CrossEncoderScorer", Refuse)
    again = p.cross_encoder_scores(queries, texts)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AssertionError, match="recomputed"):  # other texts: not in the cache
        p.cross_encoder_scores(queries[:1], [[p.corpus_texts[3]]])
    with pytest.raises(AssertionError, match="recomputed"):  # the int8 graph has its own entries
        p.cross_encoder_scores(queries, texts, onnx_file="model.int8.onnx")


@pytest.mark.parametrize("kind", ["colbert", "cross-encoder"])
def test_rerank_interpolation_weights_tuned_on_dev(built, kind):
    _, _, p, _ = built
    tuned = tune_rerank_weights(p, kind, tune_hybrid(p)["dense_weight"])
    assert tuned["tuned_on"] == "train dev slice"
    assert "one-standard-error" in tuned["selection"]
    for stage in ("dense", "sparse", "hybrid"):
        curve = tuned["dev_nDCG@10"][stage]
        assert list(curve) == [str(round(0.1 * i, 1)) for i in range(11)]
        w = tuned["weights"][stage]
        assert str(w) in curve
    # the artifact records the weights it was built with (an earlier test may have rebuilt it)
    manifest = json.loads((Path(p.cfg.artifact_dir) / "manifest.json").read_text())
    recorded = manifest["indexes"]["colbert"] if kind == "colbert" else manifest["models"]["cross-encoder"]
    assert set(recorded["interpolation"]["weights"]) == {"dense", "sparse", "hybrid"}
    assert set(recorded["interpolation"]["dev_nDCG@10"]) == {"dense", "sparse", "hybrid"}


@pytest.mark.parametrize("kind", ["colbert", "cross-encoder"])
def test_rerank_scores_over_the_union_match_each_list(built, kind):
    """Scoring each query's candidates once, over the union of the first stages' lists, gives
    every list the scores the reranker gives its candidates on their own."""
    from models.encoders import DenseEncoder

    _, _, p, _ = built
    queries = p.load_mined()["dev"]["queries"][:3]
    dense_q = DenseEncoder(p.onnx_dir("dense")).encode_queries(queries)
    firsts = p.first_stage_lists(queries, dense_q, 0.5, 10)
    union = rerank_scores(p, kind, queries, firsts)
    for stage, lists in firsts.items():
        alone = rerank_scores(p, kind, queries, {stage: lists})[stage]
        assert [len(x) for x in union[stage]] == [len(c) for c, _ in lists]
        for a, b in zip(union[stage], alone):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no reranker"):
        rerank_scores(p, "bm25", queries, firsts)


def test_cross_encoder_row_interpolates_with_dense(built):
    """dense+cross-encoder mixes the cross-encoder's and the dense student's z-scores by the
    dev-tuned weight; at weight 1 it is the plain row, at weight 0 the dense student's ranking."""
    _, _, p, result = built
    systems = result["systems"]
    for w, same_as in [(1.0, "dense+cross-encoder-plain"), (0.0, "dense")]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(index_build.evaluate, "tune_rerank_weights", fixed_weights(w))
            got = evaluate_collection(p)
        assert got["dense+cross-encoder"] == pytest.approx(systems[same_as]), w


def test_per_channel_int8_export_option(built, tiny_beir, tiny_bert):
    """``export_int8_per_channel`` (on by default) off re-exports (new export keys) while the
    fp32 graph's caches are kept: one weight scale per matrix."""
    root, cfg, p, _ = built
    assert cfg.export_int8_per_channel
    per = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, root, "train.dense.epochs=2",
                                               "export_int8_per_channel=false"))
    q = Pipeline(per, progress=False)
    for kind in ("dense", "colbert", "cross-encoder"):
        assert q.export_key(kind) != p.export_key(kind)
        assert q.export_key(kind, "model.int8.onnx") != p.export_key(kind, "model.int8.onnx")
        assert q.export_key(kind, "model.onnx") == p.export_key(kind, "model.onnx")
        assert q.distill_key(kind) == p.distill_key(kind)
    q.mine()
    q.distill("dense")
    rec = q.export("dense")
    assert not rec.cached and rec.result["parity_max_abs_diff"] <= 1e-4
    import onnx
    from onnx import numpy_helper

    inits = onnx.load(str(q.onnx_dir("dense") / "model.int8.onnx")).graph.initializer
    assert max(numpy_helper.to_array(t).size for t in inits if t.name.endswith("_scale")) == 1


def test_per_token_int8_export_option(built, tiny_beir, tiny_bert):
    """``export_int8_activations = "token"`` changes the int8 graphs' keys only; others are refused."""
    root, cfg, p, _ = built
    with pytest.raises(ValueError, match="export_int8_activations must be one of tensor, token"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, root, 'export_int8_activations="row"'))
    tok = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, root, "train.dense.epochs=2",
                                               'export_int8_activations="token"',
                                               f'artifact_dir="{root}/artifacts-token"',
                                               f'evaluate.results_dir="{root}/results-token"'))
    q = Pipeline(tok, progress=False)
    for kind in ("dense", "colbert", "cross-encoder"):
        assert q.export_key(kind, "model.int8.onnx") != p.export_key(kind, "model.int8.onnx")
        assert q.export_key(kind, "model.onnx") == p.export_key(kind, "model.onnx")
        assert q.distill_key(kind) == p.distill_key(kind)
    q.run_all()
    # served with int8 query encoders: a query batched with others scores as alone (to float
    # rounding; with per-tensor scales it moves by the quantization step)
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(artifact_dir=Path(tok.artifact_dir), threads=1, use_int8=True, int8_models="dense,colbert",
                        warmup=False)
    queries = ["vitamin bone", "gene mutation and dna expression in the brain cortex of the elderly", "heart"]
    with TestClient(create_app(settings)) as c:
        for rerank in ("none", "colbert"):
            body = {"k": 5, "candidates": 10, "rerank": rerank, "first_stage": "dense"}
            batch = c.post("/search/batch", json={"queries": queries, **body}).json()["results"]
            for query, res in zip(queries, batch):
                alone = c.post("/search", json={"query": query, **body}).json()["hits"]
                assert [h["id"] for h in res["hits"]] == [h["id"] for h in alone]
                # the rerank's z-scored interpolation turns the graphs' ~1e-6 differences into ~1e-5
                assert [h["score"] for h in res["hits"]] == pytest.approx([h["score"] for h in alone], abs=1e-4)


@pytest.mark.parametrize("retrieval", [True, False], ids=["full-corpus", "pools"])
def test_dense_dev_scores_reuse_cached_encodings(tiny_beir, tiny_bert, tmp_path, monkeypatch, retrieval):
    """The untrained student's dev score (full-corpus dev retrieval, or reranking each dev
    query's pool) comes from the base model's cached encodings and the WiSE-FT export's from
    the exported graph (its corpus encodings cached for evaluate); both equal what encoding
    with the torch model gives."""
    import torch

    from index_build.students import interpolate_with_base, load_student, new_student
    from models.sources import resolve_model

    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path,
                                               f"train.dense.dev_retrieval={str(retrieval).lower()}",
                                               'students.kinds=["dense"]', "train.dense.wise_ft=0.5"))
    p = Pipeline(cfg, progress=False)
    p.mine()
    dev = p.load_mined()["dev"]
    torch_eval = dev_evaluator(p, dev, retrieval=retrieval)
    base = new_student("dense", resolve_model(cfg.students.base), max_doc_len=cfg.students.max_doc_len)
    base.eval()
    with torch.inference_mode():
        expected0 = torch_eval(base)
    assert base_dense_dev_score(p, dev, base, retrieval) == pytest.approx(expected0, abs=1e-4)
    other = new_student("dense", resolve_model(cfg.students.base), max_doc_len=32)
    assert base_dense_dev_score(p, dev, other, retrieval) is None  # other lengths: not the cached model

    calls = []
    real = index_build.distill.dev_evaluator

    def counting(ctx, d, retrieval=False):
        fn = real(ctx, d, retrieval=retrieval)
        return lambda s: calls.append(1) or fn(s)

    monkeypatch.setattr(index_build.distill, "dev_evaluator", counting)
    res = p.distill("dense").result
    assert tuple(res["dev_history"][0]) == (0, pytest.approx(expected0, abs=1e-4))
    assert len(calls) == len(res["dev_history"]) - 1  # step 0 was not encoded again
    encoded = []
    monkeypatch.setattr(p, "dense_corpus", lambda *a, real=p.dense_corpus: encoded.append(1) or real(*a))
    rec = p.export("dense").result
    assert retrieval or encoded  # the pools are scored from the exported graph's corpus encodings
    mixed = interpolate_with_base(load_student(p.work / "distill-dense" / "student"),
                                  resolve_model(cfg.students.base), 0.5)
    mixed.eval()
    with torch.inference_mode():
        assert rec["dev_nDCG@10"] == pytest.approx(real(p, dev, retrieval=retrieval)(mixed), abs=1e-3)


def test_new_heads_are_seeded_whatever_ran_before(built, tiny_beir, tiny_bert, tmp_path):
    """A student's new parameters (ColBERT projection, cross-encoder classifier) are drawn after
    seeding with its train seed: the same trained student whatever the process did before."""
    import torch

    _, _, p, _ = built
    other = Pipeline(load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "train.dense.epochs=2")),
                     progress=False)
    other.mine()
    for kind in ("colbert", "cross-encoder"):
        torch.manual_seed(12345)
        torch.rand(1000)  # a different RNG history than the fixture's build
        other.distill(kind)
        mine = torch.load(other.work / f"distill-{kind}" / "student" / "head.pt", weights_only=True)
        theirs = torch.load(p.work / f"distill-{kind}" / "student" / "head.pt", weights_only=True)
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], msg=f"{kind} {name}")


@pytest.mark.parametrize("kind", ["dense", "colbert", "cross-encoder"])
def test_pool_scores_encode_each_document_once_and_match_per_query_scores(built, kind):
    """The dev evaluation's pool scores (distinct documents encoded once) equal scoring each
    query's pool on its own with the training loop's scorer."""
    import torch

    from index_build.students import load_student
    from index_build.train import pool_scores, student_scores

    _, _, p, _ = built
    student = load_student(p.work / f"distill-{kind}" / "student")
    student.eval()
    texts = p.corpus_texts
    pools = [np.array([0, 3, 5, 1]), np.array([5, 2]), np.array([3, 0, 4, 6, 5])]
    queries = ["first query", "another one", "a third query with more words"]
    seen: list[str] = []
    if kind != "cross-encoder":
        real = student.encode_docs
        student.encode_docs = lambda t: seen.extend(t) or real(t)  # type: ignore[method-assign]
    with torch.inference_mode():
        got = pool_scores(student, queries, pools, texts, batch_size=2)
        if kind != "cross-encoder":
            assert sorted(seen) == sorted(texts[i] for i in {int(d) for pool in pools for d in pool})
            student.encode_docs = real  # type: ignore[method-assign]
        for q, pool, g in zip(queries, pools, got):
            want = student_scores(student, [q], [[texts[int(d)] for d in pool]])[0][0].numpy()
            assert g.shape == (len(pool),)
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


def test_a_reranker_without_dev_gain_gets_weight_zero(built, monkeypatch):
    """A reranker that adds nothing on the dev slice (the same score for every candidate) or
    only harms (the first stage's order reversed) gets weight 0, the first stage alone, and
    the record says so."""
    _, _, p, _ = built

    def constant(ctx, kind, texts, firsts):
        return {stage: [np.ones(len(c)) for c, _ in lists] for stage, lists in firsts.items()}

    def reversed_first(ctx, kind, texts, firsts):
        return {stage: [-np.asarray(s) for _, s in lists] for stage, lists in firsts.items()}

    for scores in (constant, reversed_first):
        monkeypatch.setattr(index_build.tune, "rerank_scores", scores)
        monkeypatch.setattr(p, "tuning", {})
        tuned = tune_rerank_weights(p, "colbert", tune_hybrid(p)["dense_weight"])
        assert tuned["weights"] == {"dense": 0.0, "sparse": 0.0, "hybrid": 0.0}, scores.__name__
        assert tuned["no_dev_gain"] == ["dense", "sparse", "hybrid"]
        assert "toward the first stage alone" in tuned["selection"]


def test_build_log_names_each_stage_and_the_summary_says_how_to_serve(built, caplog):
    import logging

    from index_build.evaluate import build_summary

    _, _, p, result = built
    assert p.plan[0] == "mine" and p.plan[-2:] == ["evaluate", "artifact"] and "distill-colbert" in p.plan
    text = build_summary(p, result, p.records)
    assert "served-default" in text and "served by default: first_stage=" in text
    assert f"serve it:  NRS_ARTIFACT_DIR={p.cfg.artifact_dir} python -m service" in text and "MiB)" in text
    p.plan.append("probe")
    with caplog.at_level(logging.INFO, logger="index_build.stages"):
        p.stage("probe", "first", lambda out: {})
        p.stage("probe", "second", lambda out: {})
    lines = [r.getMessage() for r in caplog.records if "probe" in r.getMessage()]
    n = len(p.plan)
    assert lines[0].startswith(f"stage {n}/{n}: probe") and "its last run took" not in lines[0]
    assert lines[1].startswith(f"stage {n}/{n}: probe") and "its last run took 0.0 min" in lines[1]
    p.plan.remove("probe")


def test_each_stage_announces_an_estimate_that_grows_with_the_corpus(built, caplog):
    import logging

    from index_build.estimate import Workload, fmt_minutes, stage_estimates

    _, cfg, p, _ = built
    assert set(p.plan) <= set(p.estimates) and all(v > 0 for v in p.estimates.values())
    p.estimates["probe-estimate"] = 150.0
    with caplog.at_level(logging.INFO, logger="index_build.stages"):
        p.stage("probe-estimate", "k", lambda out: {})
    line = next(r.getMessage() for r in caplog.records if "probe-estimate" in r.getMessage())
    assert line.endswith("(estimate ~2.5 min on a cold cache)")
    small = stage_estimates(cfg, Workload(n_docs=1000, train_queries=500, test_queries=100, label_free=False))
    large = stage_estimates(cfg, Workload(n_docs=10000, train_queries=5000, test_queries=100, label_free=False))
    assert all(large[k] > small[k] for k in ("mine", "distill-colbert", "evaluate"))
    assert fmt_minutes(90) == "~1.5 min" and fmt_minutes(3000) == "~50 min"


def test_cross_encoder_rows_and_weight_are_at_the_served_depth(built):
    from index_build.evaluate import with_tail

    _, cfg, p, result = built
    manifest = json.loads((Path(cfg.artifact_dir) / "manifest.json").read_text())
    depth = cfg.evaluate.served_cross_encoder_depth
    assert manifest["serving"]["cross_encoder"] == {"depth": depth, "max_len": min(128, cfg.students.max_doc_len)}
    assert manifest["models"]["cross-encoder"]["interpolation"]["depth"] == depth
    head = {"q": {"a": 0.5, "b": 2.0}}
    full = {"q": {"c": 9.0, "a": 1.0, "d": 3.0, "b": 0.0}}
    tail = with_tail(head, full)["q"]
    assert sorted(tail, key=tail.__getitem__, reverse=True) == ["b", "a", "c", "d"]
