from __future__ import annotations

import numpy as np
import pytest

from index_build.data import Doc, load_collection
from index_build.pseudo_queries import (
    KeyphraseGenerator,
    PseudoQuery,
    SentenceGenerator,
    SpanGenerator,
    StatementGenerator,
    TitleGenerator,
    filter_queries,
    is_near_copy,
    make_generator,
    round_trip_filter,
)

DOCS = [
    Doc("a", "Vitamin D and fractures", "Vitamin D deficiency raises fracture risk. Calcium intake was measured in "
        "elderly women over ten years. The trial was randomized."),
    Doc("b", "", "Tumor cells spread by metastasis. Chemotherapy reduced colorectal cancer growth in mice."),
    Doc("c", "Short", "tiny"),
]


def test_title_generator():
    qs = TitleGenerator().generate(DOCS)
    assert [(q.text, q.doc) for q in qs] == [("Vitamin D and fractures", 0), ("Short", 2)]


def test_sentence_generator_prefers_informative_sentences():
    qs = SentenceGenerator(per_doc=1, min_words=4).generate(DOCS)
    assert {q.doc for q in qs} == {0, 1}
    assert all(q.generator == "sentence" and q.text.endswith(".") for q in qs)
    assert qs[0].text in DOCS[0].text


def test_keyphrase_generator_terms_in_text_order():
    qs = KeyphraseGenerator(n_terms=3).generate(DOCS)
    by_doc = {q.doc: q.text.split() for q in qs}
    words = [w.lower().strip(".") for w in DOCS[1].text.split()]
    positions = [words.index(w) for w in by_doc[1]]
    assert positions == sorted(positions) and len(by_doc[1]) == 3
    assert 2 not in by_doc  # too few content words


def test_span_generator_cuts_seeded_word_spans_of_each_document():
    qs = SpanGenerator(per_doc=3, min_words=3, max_words=5, seed=1).generate(DOCS)
    # "Short tiny" is too short for a span
    assert [q.doc for q in qs] == [0, 0, 0, 1, 1, 1] and all(q.generator == "span" for q in qs)
    for q in qs:  # consecutive words of the document, within the length bounds
        ws = q.text.split()
        assert 3 <= len(ws) <= 5 and q.text in " ".join(DOCS[q.doc].full_text.split())
    assert [q.text for q in SpanGenerator(per_doc=3, min_words=3, max_words=5, seed=1).generate(DOCS)] == \
        [q.text for q in qs]
    assert make_generator({"kind": "span", "per_doc": 1}).generate(DOCS[:1])[0].generator == "span"
    with pytest.raises(ValueError, match="span lengths"):
        SpanGenerator(min_words=5, max_words=3)


def test_statement_generator_keeps_the_reported_clause_most_informative_first():
    docs = [
        Doc("a", "Title", "We enrolled 40 mice. These results suggest that glycolysis provides ATP for vesicles. "
            "Data showed that X rose. We conclude that loss of p53 causes thymic lymphoma in knockout mice."),
        Doc("b", "", "Tumor cells spread by metastasis. It is unclear whether it spreads."),
        Doc("c", "", "Glycolysis provides ATP for vesicles in yeast."),
    ]
    qs = StatementGenerator(per_doc=2).generate(docs)
    # "X rose" is under 4 words; the p53 clause's words are rarer in the corpus than the glycolysis
    # clause's (doc c), so it comes first; "whether" needs a reporting verb; doc c reports nothing
    assert [(q.doc, q.text) for q in qs] == [(0, "loss of p53 causes thymic lymphoma in knockout mice"),
                                             (0, "glycolysis provides ATP for vesicles")]
    assert all(q.generator == "statement" for q in qs)
    assert StatementGenerator(per_doc=1).generate(docs)[0].text == qs[0].text
    assert make_generator({"kind": "statement", "per_doc": 1}).generate(docs)[0].generator == "statement"


def test_seq2seq_generator_with_tiny_random_model(tiny_beir, tmp_path):
    pytest.importorskip("torch")
    from tests.tiny import write_tiny_seq2seq

    model = write_tiny_seq2seq(tmp_path / "bart", tiny_beir)
    gen = make_generator({"kind": "seq2seq", "model_ref": str(model), "per_doc": 2, "max_new_tokens": 6})
    docs = load_collection(tiny_beir).docs[:3]
    qs = gen.generate(docs)
    assert len(qs) == 6 and [q.doc for q in qs] == [0, 0, 1, 1, 2, 2]
    assert all(isinstance(q.text, str) for q in qs)


def test_unknown_generator():
    with pytest.raises(ValueError, match="unknown pseudo-query generator"):
        make_generator({"kind": "oracle"})


def test_filters_drop_copies_duplicates_and_cap():
    copied = PseudoQuery(DOCS[1].text, 1, "sentence")  # the whole text: a near-copy
    qs = [
        copied,
        PseudoQuery("vitamin fracture risk", 0, "keyphrase"),
        PseudoQuery("Vitamin   fracture RISK", 0, "keyphrase"),  # duplicate after normalization
        PseudoQuery("calcium", 0, "keyphrase"),  # too short
        PseudoQuery("elderly calcium intake", 0, "keyphrase"),
        PseudoQuery("randomized trial women", 0, "keyphrase"),  # over the per-doc cap of 2
    ]
    assert is_near_copy(copied.text, DOCS[1])
    kept, stats = filter_queries(qs, DOCS, min_words=2, per_doc=2)
    texts = {q.text for q in kept}
    assert copied.text not in texts and "calcium" not in texts
    assert len(kept) == 2 and all(q.doc == 0 for q in kept)
    assert stats["near_copy"] == 1 and stats["duplicate"] == 1 and stats["too_short"] == 1
    assert stats["per_doc_cap"] == 1
    few, s2 = filter_queries(qs, DOCS, per_doc=5, budget=1)
    assert len(few) == 1 and s2["budget"] >= 1


def test_round_trip_keeps_only_queries_whose_source_ranks_high():
    qs = [PseudoQuery("q1", 5, "x"), PseudoQuery("q2", 7, "x")]
    pools = [np.array([1, 5, 9]), np.array([7, 2, 3, 4])]
    scores = [np.array([0.1, 0.9, 0.3]), np.array([0.0, 0.9, 0.8, 0.7])]
    assert round_trip_filter(qs, pools, scores, top_k=1) == [True, False]
    assert round_trip_filter(qs, pools, scores, top_k=4) == [True, True]


def test_label_free_switch_and_pipeline(tmp_path, tiny_bert):
    pytest.importorskip("torch")
    import json

    from index_build.config import load_config
    from index_build.stages import Pipeline
    from tests.conftest import tiny_overrides
    from tests.tiny import write_tiny_beir

    data = write_tiny_beir(tmp_path / "bare", with_labels=False)
    cfg = load_config(overrides=tiny_overrides(data, tiny_bert, tmp_path, "label_free.dev_queries=5",
                                               'students.kinds=["dense", "colbert"]'))
    p = Pipeline(cfg, progress=False)
    assert p.label_free
    rec = p.mine()
    assert rec.result["label_free"] and rec.result["pseudo_queries"] > 20
    assert set(rec.result["by_generator"]) <= {"title", "sentence", "keyphrase"}
    assert (tmp_path / "work" / "mine" / "pseudo_queries.tsv").is_file()
    p.run_all()
    from models.artifacts import verify

    m = verify(tmp_path / "artifacts")
    assert m.training["label_free"] is True
    assert m.training["pseudo_queries"]["generators"] == cfg.label_free.generators
    # pseudo-queries favour BM25 by construction: the hybrid keeps its prior (equal weights here)
    assert m.indexes["hybrid"]["dense_weight"] == 0.5 and m.indexes["hybrid"]["tuned_on"].startswith("not tuned")
    assert json.loads((tmp_path / "results" / "bare.json").read_text())["systems"] == {}
    # the label-free dense student is interpolated with the base (WiSE-FT); ColBERT is not
    from index_build.context import LABEL_FREE_WISE_FT

    assert m.training["wise_ft"] == {"dense": LABEL_FREE_WISE_FT, "colbert": 1.0}
    assert p.records["export-dense"].result["wise_ft"] == LABEL_FREE_WISE_FT
    # the interpolated model is scored on the dev slice like the checkpoints it came from
    assert 0.0 <= p.records["export-dense"].result["dev_nDCG@10"] <= 1.0
    assert "dev_nDCG@10" not in p.records["export-colbert"].result  # not interpolated
    assert m.serving["default"]["chosen_on"] == "pseudo-query dev slice judged by the source"
    # BM25 finds a pseudo-query's source by construction: alone, it is no candidate for the default
    default = m.serving["default"]
    assert (default["first_stage"], default["rerank"]) != ("sparse", "none")
    assert "sparse+none" not in default["dev_nDCG@10"] and "sparse+none" in default["not_candidates"]
    assert {"dense+none", "hybrid+none"} <= set(default["dev_nDCG@10"])

    # judged by the teacher: its top 10 of each dev pool graded 10..1, the source graded 10
    from index_build.tune import TEACHER_JUDGED, tuning_qrels

    dev = p.load_mined()["dev"]
    assert tuning_qrels(p, dev) == dev["qrels"]
    p.cfg.evaluate.dev_judge = "teacher"
    judged = tuning_qrels(p, dev)
    doc_ids = p.collection.doc_ids
    for qid, text, pool in zip(dev["qids"], dev["queries"], dev["pools"]):
        scores = p.teacher.score([text], [pool])[0]
        order = [doc_ids[int(pool[i])] for i in sorted(range(len(pool)), key=lambda i: -scores[i])]
        (source,) = dev["qrels"][qid]
        expected = {d: TEACHER_JUDGED - r for r, d in enumerate(order[:TEACHER_JUDGED])} | {source: TEACHER_JUDGED}
        assert judged[qid] == expected


def test_label_free_flag_ignores_labels(tmp_path, tiny_beir, tiny_bert):
    from index_build.config import load_config
    from index_build.stages import Pipeline
    from tests.conftest import tiny_overrides

    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "data.label_free=true"))
    assert Pipeline(cfg, progress=False).label_free
    cfg2 = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path))
    assert not Pipeline(cfg2, progress=False).label_free
    assert Pipeline(cfg, progress=False).wise_ft("dense") < 1.0 == Pipeline(cfg2, progress=False).wise_ft("dense")


def test_wise_ft_interpolates_the_encoder_with_the_base(tiny_bert, tmp_path):
    torch = pytest.importorskip("torch")
    from index_build.students import interpolate_with_base, new_student

    base = new_student("colbert", tiny_bert).encoder.state_dict()
    student = new_student("colbert", tiny_bert)
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(1.0)
        student.proj.weight.fill_(0.5)
    trained = {k: v.clone() for k, v in student.encoder.state_dict().items()}
    interpolate_with_base(student, tiny_bert, 0.25)
    for k, v in student.encoder.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, base[k] + 0.25 * (trained[k] - base[k]))
    assert bool((student.proj.weight == 0.5).all())  # the head keeps its trained weights
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_with_base(student, tiny_bert, 1.5)


def test_query_log_trains_every_student_on_unjudged_queries_never_on_evaluated_ones(tmp_path, tiny_beir, tiny_bert):
    pytest.importorskip("torch")
    import json
    import shutil

    from index_build.config import ConfigError, load_config
    from index_build.data import load_collection
    from index_build.distill import asymmetric_training_texts
    from index_build.stages import Pipeline
    from tests.conftest import tiny_overrides

    log = tmp_path / "log.jsonl"  # the collection's queries, test ones included, read as a log without judgments
    shutil.copyfile(tiny_beir / "queries.jsonl", log)
    first_test = next(iter(load_collection(tiny_beir).split_queries("test").values()))
    with log.open("a") as f:  # a test query in other case and spacing is the same query: never trained on
        f.write(json.dumps({"_id": "shout", "text": f"  {first_test.upper()}  "}) + "\n")
    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "data.label_free=true",
                                               "label_free.dev_queries=5", f'label_free.query_log="{log}"',
                                               'students.kinds=["asymmetric"]', "asymmetric.log_draws=4"))
    p = Pipeline(cfg, progress=False)
    rec = p.mine()
    mined = p.load_mined()
    test = set(p.collection.split_queries("test").values())
    expected = [t for t in dict.fromkeys(p.collection.queries.values()) if t not in test | set(mined["dev"]["queries"])]
    assert mined["query_log"] == expected and len(expected) < len(set(p.collection.queries.values()))
    info = rec.result["query_log"]
    assert info["kept"] == len(expected) and info["held_out_dropped"] == info["queries"] - len(expected)
    from_log = [e for e in mined["examples"] if e.qid.startswith("log")]
    assert {e.query for e in from_log} <= set(expected) and len(from_log) > len(expected) // 2
    # no judgment is read: the teacher's top candidates are each logged query's positives
    for e in from_log[:3]:
        assert set(e.positives) == set(np.argsort(-e.teacher)[:3].tolist())
    texts, draws, about, sources = asymmetric_training_texts(p, mined["dev"])
    n = about["query_log"]
    assert n == len({e.query for e in from_log}) and set(texts[:n]) <= set(expected)
    assert (draws[:n] == 4).all() and (draws[n:] <= cfg.asymmetric.mined_draws).all()
    # a logged query has no source document; every pseudo-query's words are its source's
    from index_build.pseudo_queries import words
    assert (sources[:n] == -1).all() and (sources[n:] >= 0).all() and len(texts) > n
    for t, src in zip(texts[n:], sources[n:]):
        assert set(words(t)) <= set(words(p.collection.docs[src].full_text))
    assert not test & set(texts)
    # the log is part of the mine stage's key by content, and no part of it when unset
    key = p.mine_key()
    with log.open("a") as f:
        f.write('{"_id": "extra", "text": "one more logged query"}\n')
    assert Pipeline(cfg, progress=False).mine_key() != key
    bare = tiny_overrides(tiny_beir, tiny_bert, tmp_path, "data.label_free=true")
    assert (Pipeline(load_config(overrides=bare), progress=False).mine_key()
            == Pipeline(load_config(overrides=[*bare, 'label_free.query_log=""']), progress=False).mine_key())
    labelled = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, f'label_free.query_log="{log}"'))
    with pytest.raises(ConfigError, match="label-free builds only"):
        Pipeline(labelled, progress=False).mine_key()
    with pytest.raises(ConfigError, match="log_draws"):
        load_config(overrides=[*bare, "asymmetric.log_draws=0"])


def test_logged_queries_held_out_as_a_teacher_judged_dev_slice(tmp_path, tiny_beir, tiny_bert):
    """``label_free.log_dev_queries``: part of the log replaces the pseudo-query dev slice,
    judged by the teacher's ranking of each query's pool, never trained on; BM25 alone is then
    a candidate default (real queries do not favour it by construction)."""
    pytest.importorskip("torch")
    import shutil

    from index_build.config import ConfigError, load_config
    from index_build.distill import asymmetric_training_texts
    from index_build.stages import Pipeline
    from index_build.tune import TEACHER_JUDGED, choose_default, tune_hybrid
    from tests.conftest import tiny_overrides

    log = tmp_path / "log.jsonl"
    shutil.copyfile(tiny_beir / "queries.jsonl", log)
    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, "data.label_free=true",
                                               "label_free.dev_queries=5", f'label_free.query_log="{log}"',
                                               "label_free.log_dev_queries=2", 'students.kinds=["asymmetric"]',
                                               "asymmetric.batch=8", "asymmetric.pool_size=8", "asymmetric.epochs=1"))
    p = Pipeline(cfg, progress=False)
    assert not p.pseudo_dev
    rec = p.mine()
    mined = p.load_mined()
    dev = mined["dev"]
    assert len(dev["qids"]) == 2 == rec.result["dev_queries"] and all(q.startswith("logdev") for q in dev["qids"])
    logged = set(p.collection.queries.values()) - set(p.collection.split_queries("test").values())
    assert set(dev["queries"]) <= logged and not set(dev["queries"]) & set(mined["query_log"])
    assert not any(e.qid.startswith("pq") for e in mined["examples"] if e.query in set(dev["queries"]))
    texts, _, _, _ = asymmetric_training_texts(p, dev)
    assert not set(dev["queries"]) & set(texts)
    # judged by the teacher: its top TEACHER_JUDGED of each pool, graded by rank
    from index_build.teachers import cached_teacher_scores

    scores = cached_teacher_scores(p.teacher, p.cache, dev["queries"], dev["pools"])
    for qid, pool, s in zip(dev["qids"], dev["pools"], scores):
        best = p.collection.doc_ids[int(np.asarray(pool)[np.argmax(s)])]
        assert dev["qrels"][qid][best] == TEACHER_JUDGED and len(dev["qrels"][qid]) == min(TEACHER_JUDGED, len(pool))
    assert rec.result["query_log"]["dev"] == 2
    p.distill("asymmetric")
    p.export("asymmetric")
    default = choose_default(p)
    assert default["chosen_on"] == "query-log dev slice judged by the teacher"
    assert "sparse+none" in default["dev_nDCG@10"] and "not_candidates" not in default
    assert tune_hybrid(p)["tuned_on"] == "query-log dev slice judged by the teacher"
    bare = tiny_overrides(tiny_beir, tiny_bert, tmp_path, "data.label_free=true")
    with pytest.raises(ConfigError, match="names no log"):
        load_config(overrides=[*bare, "label_free.log_dev_queries=3"])
    with pytest.raises(ConfigError, match="0 or more"):
        load_config(overrides=[*bare, f'label_free.query_log="{log}"', "label_free.log_dev_queries=-1"])


def test_a_label_free_build_reports_on_the_judged_splits_it_never_read(tmp_path, tiny_beir, tiny_bert):
    """``evaluate.extra_splits``: every row on another judged split, as on the test split, with
    its per-query scores, leaving out the queries of a query log; only a label-free build
    may ask for them."""
    pytest.importorskip("torch")
    import json

    from index_build.config import ConfigError, load_config
    from index_build.evaluate import evaluate_collection
    from index_build.stages import Pipeline
    from tests.conftest import tiny_overrides

    args = ["data.label_free=true", "label_free.dev_queries=5", 'students.kinds=["asymmetric"]', "asymmetric.epochs=1",
            "asymmetric.batch=8", "asymmetric.eval_every=10", "asymmetric.pool_size=8", "asymmetric.pool_depth=10",
            "build_artifact=false"]
    extra = 'evaluate.extra_splits=["train"]'
    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, *args, extra))
    p = Pipeline(cfg, progress=False)
    result = p.run_all()
    train = result["splits"]["train"]
    assert {"bm25", "base-dense", "teacher", "asym-dense", "served-default"} <= set(train)
    assert train == evaluate_collection(p, "train") and train != result["systems"]
    per_query = json.loads((tmp_path / "results" / f"{tiny_beir.name}.per-query.json").read_text())
    judged = set(p.collection.qrels["train"])
    assert set(per_query["splits"]["train"]) == set(train)
    for name, scores in per_query["splits"]["train"].items():
        assert set(scores) == judged
        assert train[name]["nDCG@10"] == pytest.approx(np.mean(list(scores.values())), abs=1e-4)
    assert "never read" in (tmp_path / "results" / f"{tiny_beir.name}.md").read_text()
    assert "splits" not in result["stages"]["evaluate"]
    # the test split's own key is unchanged without extra splits (older builds stay up to date)
    plain = Pipeline(load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, *args)), progress=False)
    assert plain.mine_key() == p.mine_key() and plain.evaluate_key() != p.evaluate_key()
    assert plain.evaluate_key() == Pipeline(load_config(overrides=tiny_overrides(
        tiny_beir, tiny_bert, tmp_path, *args, "evaluate.extra_splits=[]")), progress=False).evaluate_key()
    # checked before any stage runs
    labelled = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path / "l", extra))
    with pytest.raises(ConfigError, match="'train' judgments"):
        Pipeline(labelled, progress=False).run_all()
    unknown = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path / "u", *args,
                                                   'evaluate.extra_splits=["dev"]'))
    with pytest.raises(ConfigError, match="no judgments for"):
        Pipeline(unknown, progress=False).run_all()
    with pytest.raises(ConfigError, match="other than data.test_split"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'evaluate.extra_splits=["test"]'))
    # with a query log, the extra split is evaluated on the queries the log does not hold
    train_queries = p.collection.split_queries("train")
    in_log = list(train_queries)[:2]
    log = tmp_path / "log.txt"
    log.write_text("".join(f"  {train_queries[q].upper()} \n" for q in in_log) + "a logged query\n")
    g = Pipeline(load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path / "g", *args,
                                                      f'label_free.query_log="{log}"', extra)), progress=False)
    logged = g.run_all()
    assert logged["stages"]["evaluate"]["splits_logged"] == {
        "train": {"judged": len(train_queries), "logged": 2, "evaluated": len(train_queries) - 2}}
    per_query = json.loads((tmp_path / "g" / "results" / f"{tiny_beir.name}.per-query.json").read_text())
    assert set(per_query["splits"]["train"]["asym-dense"]) == set(train_queries) - set(in_log)
    assert set(per_query["collection"]["asym-dense"]) == set(p.collection.split_queries("test"))
