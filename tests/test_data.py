from __future__ import annotations

import json

import pytest

from index_build.data import DataError, load_collection, load_query_log, load_trec_run, query_log_checksum
from models.artifacts import sha256_file


def _write(root, corpus, queries=None, qrels=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    if queries is not None:
        (root / "queries.jsonl").write_text("\n".join(queries) + "\n")
    if qrels is not None:
        (root / "qrels").mkdir(exist_ok=True)
        (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def doc(i, text="some text", title="t"):
    return json.dumps({"_id": i, "title": title, "text": text})


def test_loads_tiny_collection(tiny_beir):
    c = load_collection(tiny_beir)
    assert len(c.docs) == 60
    assert set(c.qrels) == {"train", "test"}
    assert len(c.split_queries("test")) == 6
    assert c.docs[0].full_text.startswith(c.docs[0].title)
    assert c.checksum() == load_collection(tiny_beir).checksum()


def test_malformed_json_names_file_and_line(tmp_path):
    root = _write(tmp_path / "c", [doc("a"), "{not json", doc("b")])
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: invalid JSON"):
        load_collection(root)


def test_duplicate_doc_id(tmp_path):
    root = _write(tmp_path / "c", [doc("a"), doc("b"), doc("a")])
    with pytest.raises(DataError, match=r"corpus\.jsonl:3: duplicate document id 'a' \(first seen on line 1\)"):
        load_collection(root)


def test_missing_field_and_empty_doc(tmp_path, caplog):
    root = _write(tmp_path / "c", [json.dumps({"title": "x", "text": "y"})])
    with pytest.raises(DataError, match=r":1: missing field '_id'"):
        load_collection(root)
    root = _write(tmp_path / "d", [json.dumps({"_id": "a", "title": "", "text": "  "}), doc("b")])
    c = load_collection(root)  # kept (qrels may point at it), with a warning naming file and line
    assert c.doc_ids == ["a", "b"] and "corpus.jsonl:1: document 'a' has neither title nor text" in caplog.text


def test_duplicate_query_id(tmp_path):
    q = json.dumps({"_id": "q1", "text": "hello"})
    root = _write(tmp_path / "c", [doc("a")], [q, q])
    with pytest.raises(DataError, match=r"queries\.jsonl:2: duplicate query id 'q1'"):
        load_collection(root)


def test_qrels_unknown_doc_and_query(tmp_path):
    q = json.dumps({"_id": "q1", "text": "hello"})
    root = _write(tmp_path / "c", [doc("a")], [q], "query-id\tcorpus-id\tscore\nq1\ta\t1\nq1\tzzz\t1\n")
    with pytest.raises(DataError, match=r"test\.tsv:3: qrels point at unknown document 'zzz'"):
        load_collection(root)
    root = _write(tmp_path / "d", [doc("a")], [q], "query-id\tcorpus-id\tscore\nq9\ta\t1\n")
    with pytest.raises(DataError, match=r"test\.tsv:2: qrels point at unknown query 'q9'"):
        load_collection(root)
    root = _write(tmp_path / "e", [doc("a")], [q], "query-id\tcorpus-id\tscore\nq1\ta\tx\n")
    with pytest.raises(DataError, match=r"test\.tsv:2: relevance grade 'x'"):
        load_collection(root)


def test_corpus_only_has_no_labels(tmp_path):
    root = _write(tmp_path / "c", [doc("a"), doc("b")])
    c = load_collection(root)
    assert not c.has_labels and c.queries == {} and c.qrels == {}


def test_trec_run(tmp_path):
    p = tmp_path / "run.trec"
    p.write_text("1 Q0 a 1 2.0 x\n1 Q0 b 2 3.0 x\n2 Q0 c 1 1.0 x\n")
    run = load_trec_run(p, depth=1)
    assert run == {"1": [("b", 3.0)], "2": [("c", 1.0)]}
    p.write_text("1 Q0 a 1\n")
    with pytest.raises(DataError, match=r"run\.trec:1"):
        load_trec_run(p)


def test_pool_corpus_keeps_outside_judgments(tmp_path):
    q = json.dumps({"_id": "q1", "text": "hello"})
    root = _write(tmp_path / "c", [doc("a")], [q], "query-id\tcorpus-id\tscore\nq1\ta\t1\nq1\tzzz\t2\n")
    c = load_collection(root, unknown_docs="keep")  # a TREC DL pool: judged passages outside it count in nDCG
    assert c.qrels["test"]["q1"] == {"a": 1, "zzz": 2}


def test_query_log_formats(tmp_path):
    beir = tmp_path / "log.jsonl"
    beir.write_text('{"_id": "1", "text": "what is  a  spline"}\n\n{"_id": "2", "text": "wing flutter"}\n'
                    '{"_id": "3", "text": "what is a spline"}\n{"_id": "4", "text": "Wing  Flutter"}\n')
    # whitespace folded; duplicates, case variants included, once in their first form
    assert load_query_log(beir) == ["what is a spline", "wing flutter"]
    tsv = tmp_path / "queries.tsv"
    tsv.write_text("19335\tanthropological definition of environment\n47923\taxon\tterminal\n\n")
    assert load_query_log(tsv) == ["anthropological definition of environment", "axon terminal"]
    txt = tmp_path / "log.txt"
    txt.write_text("boundary layer transition\r\n  \nshock wave\n")
    assert load_query_log(txt) == ["boundary layer transition", "shock wave"]


def test_query_log_folder_reads_every_log_file_in_it(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "queries.jsonl").write_text('{"_id": "a", "text": "shock wave"}\n')
    (logs / "queries.1.jsonl").write_text('{"_id": "b", "text": "wing flutter"}\n{"_id": "c", "text": "shock wave"}\n')
    (logs / "notes.md").write_text("not a log\n")
    assert load_query_log(logs) == ["wing flutter", "shock wave"]
    before = query_log_checksum(logs)
    assert before != query_log_checksum(logs / "queries.jsonl") == sha256_file(logs / "queries.jsonl")
    (logs / "queries.2.jsonl").write_text('{"_id": "d", "text": "boundary layer"}\n')
    assert query_log_checksum(logs) != before  # a new rotated part re-keys the mine stage
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .jsonl/.tsv/.txt file"):
        load_query_log(empty)


def test_query_log_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_query_log(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="holds no query"):
        load_query_log(tmp_path / "blank.txt")
    (tmp_path / "bad.tsv").write_text("1\tok\nno tab here\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected id<TAB>text"):
        load_query_log(tmp_path / "bad.tsv")
    (tmp_path / "bad.jsonl").write_text('{"_id": "1"}\n')
    with pytest.raises(DataError, match="missing field 'text'"):
        load_query_log(tmp_path / "bad.jsonl")
