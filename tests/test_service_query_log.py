"""The opt-in query log: what the service writes is what a later build reads back."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from index_build.data import load_query_log
from service.app import create_app
from service.errors import StartupError
from service.query_log import rotated_name
from tests.service_fixtures import ServiceArtifacts, build_service_artifacts, make_settings, metric_value, wait_ready


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_beir, tiny_bert) -> ServiceArtifacts:
    return build_service_artifacts(tmp_path_factory, tiny_beir, tiny_bert)


def test_answered_queries_are_logged_as_a_query_log_the_builder_reads(artifacts, tmp_path):
    log = tmp_path / "logs" / "queries.jsonl"
    with TestClient(create_app(make_settings(artifacts.first, query_log_path=log))) as c:
        wait_ready(c)
        assert c.post("/search", json={"query": "  tumor   growth "}, headers={"x-request-id": "r1"}).status_code == 200
        r = c.post("/search/batch", json={"queries": ["insulin", "gene expression"], "rerank": "none"},
                   headers={"x-request-id": "r2"})
        assert r.status_code == 200
        assert c.post("/search/batch", json={"queries": ["fine", ""]}).status_code == 422  # not answered: not logged
        assert c.post("/search", json={"query": "x", "k": 0}).status_code == 422
        metrics = c.get("/metrics").text
        version = c.get("/info").json()["artifact_version"]
    # the app has stopped: every queued line is written, each text as it was searched
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [(x["_id"], x["text"]) for x in lines] == [("r1", "  tumor   growth "), ("r2-0", "insulin"),
                                                      ("r2-1", "gene expression")]
    assert {x["artifact_version"] for x in lines} == {version}
    assert lines[1]["rerank"] == "none" and lines[1]["first_stage"] in {"dense", "sparse", "hybrid"}
    assert load_query_log(log) == ["tumor growth", "insulin", "gene expression"]
    assert metric_value(metrics, "nrs_query_log_lines_total", outcome="queued") == 3
    assert metric_value(metrics, "nrs_query_log_lines_total", outcome="dropped") == 0


def test_log_rotates_into_parts_a_build_reads_as_one_folder(artifacts, tmp_path):
    log = tmp_path / "logs" / "queries.jsonl"
    settings = make_settings(artifacts.first, query_log_path=log, query_log_max_mb=400 / (1 << 20),
                             query_log_backups=50)
    queries = [f"query number {i} about protein folding" for i in range(12)]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        for q in queries:
            assert c.post("/search", json={"query": q}).status_code == 200
    parts = sorted(p.name for p in log.parent.iterdir())
    assert "queries.jsonl" in parts and "queries.1.jsonl" in parts and len(parts) > 2
    assert all(p.endswith(".jsonl") for p in parts)
    assert sorted(load_query_log(log.parent)) == sorted(queries)


def test_no_log_without_the_setting_and_a_sampled_share_with_it(artifacts, tmp_path):
    with TestClient(create_app(make_settings(artifacts.first))) as c:
        wait_ready(c)
        assert c.app.state.service.query_log is None  # type: ignore[attr-defined]
        assert c.post("/search", json={"query": "tumor"}).status_code == 200
        assert metric_value(c.get("/metrics").text, "nrs_query_log_lines_total", outcome="queued") is None
    log = tmp_path / "queries.jsonl"
    with TestClient(create_app(make_settings(artifacts.first, query_log_path=log, query_log_sample=0.5))) as c:
        wait_ready(c)
        for i in range(40):
            assert c.post("/search", json={"query": f"tumor {i}"}).status_code == 200
    n = len(log.read_text().splitlines())
    assert 5 <= n <= 35  # about half of 40 (a binomial draw: outside these bounds in under one run in a million)


def test_bad_log_paths_are_refused_at_start(artifacts, tmp_path):
    with pytest.raises(ValidationError, match=r"must end in \.jsonl"):
        make_settings(artifacts.first, query_log_path=tmp_path / "queries.txt")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(StartupError, match="query_log_path .* is not writable"):
        with TestClient(create_app(make_settings(artifacts.first, query_log_path=blocker / "queries.jsonl"))):
            pass
    folder = tmp_path / "taken.jsonl"
    folder.mkdir()
    with pytest.raises(StartupError, match="is a directory"):
        with TestClient(create_app(make_settings(artifacts.first, query_log_path=folder))):
            pass


def test_rotated_parts_keep_the_jsonl_suffix():
    assert rotated_name("/var/log/nrs/queries.jsonl.12") == "/var/log/nrs/queries.12.jsonl"
