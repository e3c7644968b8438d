"""The HTTP API on a tiny artifact: every route, every first stage and rerank mode, errors,
authentication, metrics and headers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.search import SearchEngine
from service.state import ServiceState
from tests.service_fixtures import (
    ServiceArtifacts,
    assert_envelope,
    build_service_artifacts,
    make_settings,
    metric_value,
    wait_ready,
)

QUERIES = ["tumor growth in cancer patients", "influenza vaccine antibody response", "blood pressure and heart risk"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_beir, tiny_bert) -> ServiceArtifacts:
    return build_service_artifacts(tmp_path_factory, tiny_beir, tiny_bert)


@pytest.fixture(scope="module")
def client(artifacts) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(artifacts.first, max_query_chars=200, max_batch_queries=4))) as c:
        wait_ready(c)
        yield c


def service_of(client: TestClient) -> ServiceState:
    return client.app.state.service  # type: ignore[attr-defined]


def engine_of(client: TestClient) -> SearchEngine:
    engine = service_of(client).engine
    assert engine is not None
    return engine


# -- plain routes ---------------------------------------------------------------------------------
def test_health_ready_info(client, artifacts):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    manifest = json.loads((artifacts.first / "manifest.json").read_text())
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "artifact_version": manifest["artifact_version"]}
    info = client.get("/info").json()
    assert info["artifact_version"] == manifest["artifact_version"]
    assert info["n_docs"] == manifest["corpus"]["n_docs"] == 60
    assert set(info["models"]) == {"dense", "colbert", "cross-encoder"}
    assert info["indexes"]["dense"]["factory"] == manifest["indexes"]["dense"]["factory"]
    assert info["indexes"]["colbert"]["bits"] == manifest["indexes"]["colbert"]["bits"]
    assert info["rerank_modes"] == ["none", "colbert", "cross-encoder"]
    assert info["first_stages"] == ["dense", "sparse", "hybrid"]
    assert info["limits"]["max_k"] == 100 and info["ready"] is True
    assert info["colbert_tokens"] == "compressed"


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/batch", "/health", "/ready", "/info", "/metrics", "/admin/reload"} <= set(paths)


# -- search ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_stage", ["dense", "sparse", "hybrid"])
@pytest.mark.parametrize("rerank", ["none", "colbert", "cross-encoder"])
def test_search_matches_engine(client, first_stage, rerank):
    body = {"query": QUERIES[0], "k": 5, "candidates": 20, "rerank": rerank, "first_stage": first_stage}
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["rerank"] == rerank and data["first_stage"] == first_stage
    assert data["artifact_version"] == engine_of(client).artifact_version
    direct = engine_of(client).search(QUERIES[0], k=5, candidates=20, rerank=rerank, first_stage=first_stage)
    assert [h["id"] for h in data["hits"]] == [h.id for h in direct.hits]
    assert [h["score"] for h in data["hits"]] == pytest.approx([h.score for h in direct.hits], abs=1e-4)
    assert [h["first_stage_score"] for h in data["hits"]] == pytest.approx(
        [h.first_stage_score for h in direct.hits], abs=1e-4)
    assert [h["rank"] for h in data["hits"]] == list(range(1, len(data["hits"]) + 1))
    assert 0 < len(data["hits"]) <= 5
    scores = [h["score"] for h in data["hits"]]
    assert scores == sorted(scores, reverse=True)
    if rerank == "none":
        assert scores == [h["first_stage_score"] for h in data["hits"]]
    assert all("text" not in h and "title" not in h for h in data["hits"])
    assert set(data["timings_ms"]) == {"queue", "tokenize", "encode", "ann", "sparse", "rerank", "fetch", "total"}
    t = data["timings_ms"]
    assert (t["ann"] > 0) == (first_stage != "sparse")
    assert (t["sparse"] > 0) == (first_stage != "dense")
    assert (t["rerank"] > 0) == (rerank != "none")
    assert t["total"] >= t["encode"]


def test_search_defaults_and_text(client, artifacts):
    """A request that names no mode is served in the artifact's default mode (the builder's
    choice on its dev queries, shown by /info); explicit fields override it."""
    built = json.loads((artifacts.first / "manifest.json").read_text())["serving"]["default"]
    assert built["first_stage"] in ("dense", "sparse", "hybrid") and built["rerank"] in ("none", "colbert")
    assert "dev_nDCG@10" in built and built["chosen_on"] == "train dev slice"
    info = client.get("/info").json()["default_mode"]
    assert info == {"first_stage": built["first_stage"], "first_stage_source": "artifact",
                    "rerank": built["rerank"], "rerank_source": "artifact"}
    data = client.post("/search", json={"query": QUERIES[1], "include_text": True}).json()
    assert len(data["hits"]) == 10 and data["rerank"] == built["rerank"] and data["first_stage"] == built["first_stage"]
    explicit = client.post("/search", json={"query": QUERIES[1], "first_stage": "sparse", "rerank": "none"}).json()
    assert explicit["first_stage"] == "sparse" and explicit["rerank"] == "none"
    docs = engine_of(client).docstore.get_by_index(range(engine_of(client).n_docs))
    by_id = {d["id"]: d for d in docs}
    for h in data["hits"]:
        assert h["title"] == by_id[h["id"]]["title"] and h["text"] == by_id[h["id"]]["text"]


def test_default_mode_from_settings(artifacts):
    settings = make_settings(artifacts.first, default_first_stage="sparse", default_rerank="colbert", warmup=False)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.get("/info").json()["default_mode"] == {
            "first_stage": "sparse", "first_stage_source": "settings", "rerank": "colbert", "rerank_source": "settings"}
        data = c.post("/search", json={"query": QUERIES[0]}).json()
        assert data["first_stage"] == "sparse" and data["rerank"] == "colbert"


def test_cross_encoder_default_candidates_capped(artifacts):
    settings = make_settings(artifacts.first, default_candidates=50, max_cross_encoder_candidates=8, warmup=False)
    with TestClient(create_app(settings)) as c:
        assert c.post("/search", json={"query": QUERIES[0], "k": 3, "rerank": "cross-encoder"}).status_code == 200
        err = assert_envelope(c.post("/search", json={"query": QUERIES[0], "rerank": "cross-encoder", "candidates": 9}),
                              422, "invalid_request")
        assert "at most 8 candidates" in err["message"]


def test_cross_encoder_rescores_the_depth_the_builder_tuned_it_at(artifacts, monkeypatch):
    manifest = json.loads((artifacts.first / "manifest.json").read_text())
    served = manifest["serving"]["cross_encoder"]
    assert served["depth"] == 20 and 16 <= served["max_len"] <= 128
    for settings, depth, max_len in ((make_settings(artifacts.first, warmup=False), 20, served["max_len"]),
                                     (make_settings(artifacts.first, cross_encoder_candidates=6,
                                                    cross_encoder_max_len=24, warmup=False), 6, 24)):
        with TestClient(create_app(settings)) as c:
            wait_ready(c)
            info = c.get("/info").json()["models"]["cross-encoder"]
            assert info["default_candidates"] == depth and info["max_len"] == max_len
            engine = engine_of(c)
            assert engine.cross_encoder is not None
            seen: list[int] = []
            score = engine.cross_encoder.score

            def counted(query: str, docs: list[str], score=score, seen=seen) -> np.ndarray:
                seen.append(len(docs))
                return score(query, docs)

            monkeypatch.setattr(engine.cross_encoder, "score", counted)
            r = c.post("/search", json={"query": QUERIES[0], "k": 3, "rerank": "cross-encoder"})
            assert r.status_code == 200 and len(r.json()["hits"]) == 3 and seen == [depth]
            ce = engine.cross_encoder
            assert ce.tokenizer.encode_pairs([QUERIES[0]], ["word " * 500], ce.max_len).input_ids.shape[1] == max_len


def test_timing_headers_and_request_id(client):
    r = client.post("/search", json={"query": QUERIES[0], "rerank": "colbert"}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    for name in ("x-total-time", "x-encode-time", "x-ann-time", "x-rerank-time", "x-queue-time"):
        assert float(r.headers[name]) >= 0
    assert float(r.headers["x-rerank-time"]) > 0
    generated = client.get("/health").headers["x-request-id"]
    assert len(generated) == 32 and generated != client.get("/health").headers["x-request-id"]
    # an unusable incoming id is replaced, not echoed
    assert client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"}).headers["x-request-id"] != "bad id"


def test_batch_matches_single_and_encodes_once(client):
    svc = service_of(client)
    before = svc.metrics.batch_size.labels("dense")._sum.get()  # type: ignore[attr-defined]
    r = client.post("/search/batch", json={"queries": QUERIES, "k": 4, "rerank": "colbert", "candidates": 10})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(QUERIES)
    assert set(r.json()["timings_ms"]) >= {"encode", "ann", "rerank", "total"}
    for q, res in zip(QUERIES, results):
        single = client.post("/search", json={"query": q, "k": 4, "rerank": "colbert", "candidates": 10}).json()
        assert [h["id"] for h in res["hits"]] == [h["id"] for h in single["hits"]]
        assert [h["score"] for h in res["hits"]] == pytest.approx([h["score"] for h in single["hits"]], abs=1e-3)
    # the batch's queries went through the dense encoder together (one batch of >= 3 texts)
    after = svc.metrics.batch_size.labels("dense")._sum.get()  # type: ignore[attr-defined]
    assert after - before >= len(QUERIES)
    text = client.get("/metrics").text
    assert metric_value(text, "nrs_encode_batch_size_bucket", model="dense", le="2.0") < metric_value(
        text, "nrs_encode_batch_size_count", model="dense")


# -- client errors -> 4xx in one envelope ---------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "error_type", "needle"),
    [
        ({"query": ""}, "invalid_request", "non-empty"),
        ({"query": "   \n\t"}, "invalid_request", "non-empty"),
        ({"query": "x" * 201}, "invalid_request", "201 characters"),
        ({"query": "q", "k": 0}, "validation_error", "body.k"),
        ({"query": "q", "k": 101}, "invalid_request", "k=101"),
        ({"query": "q", "candidates": 0}, "validation_error", "body.candidates"),
        ({"query": "q", "candidates": 1001}, "invalid_request", "candidates=1001"),
        ({"query": "q", "rerank": "bm25"}, "validation_error", "body.rerank"),
        ({"query": "q", "first_stage": "splade"}, "validation_error", "body.first_stage"),
        ({"query": "q", "rerank": "cross-encoder", "candidates": 101}, "invalid_request", "cross-encoder"),
        ({"query": "q", "nprobe": 0}, "validation_error", "body.nprobe"),
        ({"query": "q", "bogus": 1}, "validation_error", "bogus"),
        ({"k": 3}, "validation_error", "body.query"),
        ({"query": 12}, "validation_error", "body.query"),
    ],
)
def test_search_validation_errors(client, body, error_type, needle):
    err = assert_envelope(client.post("/search", json=body), 422, error_type)
    assert needle in err["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [({"queries": []}, "must not be empty"), ({"queries": ["ok", ""]}, "queries[1]: query must be a non-empty"),
     ({"queries": ["a"] * 5}, "maximum is 4"),
     ({"queries": ["ok", " "]}, "queries[1]: query must be a non-empty"), ({"queries": "not a list"}, "body.queries")],
)
def test_batch_validation_errors(client, body, needle):
    assert needle in assert_envelope(client.post("/search/batch", json=body), 422)["message"]


def test_invalid_json_is_422(client):
    r = client.post("/search", content=b'{"query": ', headers={"content-type": "application/json"})
    assert_envelope(r, 422, "validation_error")


def test_unknown_route_and_method(client):
    assert_envelope(client.get("/nope"), 404, "not_found")
    assert_envelope(client.get("/search"), 405, "method_not_allowed")


def test_rerank_or_first_stage_missing_from_artifact(client, monkeypatch):
    engine = engine_of(client)
    monkeypatch.setattr(engine, "cross_encoder", None)
    monkeypatch.setattr(engine, "colbert_encoder", None)
    monkeypatch.setattr(engine, "bm25", None)
    for rerank, needle in (("cross-encoder", "no cross-encoder"), ("colbert", "no ColBERT")):
        err = assert_envelope(client.post("/search", json={"query": "q", "rerank": rerank}), 422, "invalid_request")
        assert needle in err["message"]
    for first_stage in ("sparse", "hybrid"):
        err = assert_envelope(client.post("/search", json={"query": "q", "first_stage": first_stage, "rerank": "none"}),
                              422)
        assert "BM25" in err["message"]
    assert client.post("/search", json={"query": "q", "first_stage": "dense", "rerank": "none"}).status_code == 200


def test_body_too_large(client):
    big = json.dumps({"query": "q", "pad": "x" * (1 << 20)}).encode()
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert "1048576" in assert_envelope(r, 413, "payload_too_large")["message"]
    assert r.headers["x-request-id"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size is counted
        yield b'{"query": "q", "pad": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    assert_envelope(client.post("/search", content=chunks(), headers={"content-type": "application/json"}), 413)
    # a small streamed body still works
    small = client.post("/search", content=iter([b'{"query": ', b'"tumor growth"}']),
                        headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text


def test_unexpected_error_is_generic_500(client, monkeypatch):
    engine = engine_of(client)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "retrieve", broken)
    r = client.post("/search", json={"query": "q"}, headers={"X-Request-Id": "req-500"})
    err = assert_envelope(r, 500, "internal_error")
    assert "secret" not in r.text and r.headers["x-request-id"] == "req-500"
    assert "request id" in err["message"]


# -- metrics ----------------------------------------------------------------------------------------
def test_metrics_content(client, artifacts):
    client.post("/search", json={"query": QUERIES[2], "rerank": "colbert", "first_stage": "hybrid"})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for stage in ("total", "queue", "tokenize", "encode", "ann", "sparse", "rerank", "fetch"):
        count = metric_value(text, "nrs_stage_latency_seconds_count", stage=stage, rerank="colbert",
                             first_stage="hybrid")
        assert count is not None and count >= 1, stage
    assert metric_value(text, "nrs_stage_latency_seconds_bucket", stage="total", rerank="colbert",
                        first_stage="hybrid", le="0.0005") is not None
    assert metric_value(text, "nrs_stage_latency_seconds_bucket", stage="total", rerank="colbert",
                        first_stage="hybrid", le="10.0") is not None
    assert metric_value(text, "nrs_requests_total", route="/search", status="200", error_type="none") >= 1
    assert metric_value(text, "nrs_requests_in_flight") == 0
    assert metric_value(text, "nrs_queue_depth") == 0
    assert metric_value(text, "nrs_index_documents") == 60
    assert metric_value(text, "nrs_ready") == 1
    version = json.loads((artifacts.first / "manifest.json").read_text())["artifact_version"]
    assert metric_value(text, "nrs_artifact_info", artifact_version=version) == 1
    assert metric_value(text, "nrs_encode_batch_size_count", model="dense") >= 1


def test_error_requests_counted_by_type(client):
    client.post("/search", json={"query": " "})
    text = client.get("/metrics").text
    assert metric_value(text, "nrs_requests_total", route="/search", status="422", error_type="invalid_request") >= 1


def test_apps_have_separate_registries(client, artifacts):
    other = create_app(make_settings(artifacts.first))
    assert other.state.service.metrics.registry is not service_of(client).metrics.registry


# -- authentication -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_client(artifacts) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(artifacts.first, api_key="s3cret-key", warmup=False))) as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "/search", {"query": "tumor"}), ("post", "/search/batch", {"queries": ["tumor"]}),
    ("get", "/info", None),
])
def test_api_key_required(auth_client, method, path, body):
    call = getattr(auth_client, method)
    kwargs = {"json": body} if body is not None else {}
    r = call(path, **kwargs)
    assert "missing API key" in assert_envelope(r, 401, "unauthorized")["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    wrong = ({"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret-ke"}, {"Authorization": "Basic s3cret-key"})
    for headers in wrong:
        assert_envelope(call(path, headers=headers, **kwargs), 401, "unauthorized")
    for headers in ({"Authorization": "Bearer s3cret-key"}, {"X-API-Key": "s3cret-key"}):
        r = call(path, headers=headers, **kwargs)
        assert r.status_code == 200, r.text


def test_open_routes_need_no_key(auth_client):
    for path in ("/health", "/ready", "/metrics"):
        assert auth_client.get(path).status_code == 200, path


def test_settings_validation_and_env(monkeypatch, tmp_path: Path):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="default_k=200 is above max_k=100"):
        Settings(artifact_dir=tmp_path, default_k=200)
    with pytest.raises(ValidationError, match="max_concurrency"):
        Settings(artifact_dir=tmp_path, max_concurrency=-1)
    # permits sized to the machine unless set: two per core this process may run on
    assert Settings(artifact_dir=tmp_path).max_concurrency == 2 * len(os.sched_getaffinity(0))
    assert Settings(artifact_dir=tmp_path, max_concurrency=3).max_concurrency == 3
    monkeypatch.setenv("NRS_ARTIFACT_DIR", str(tmp_path))
    monkeypatch.setenv("NRS_MAX_K", "7")
    monkeypatch.setenv("NRS_DEFAULT_K", "5")
    monkeypatch.setenv("NRS_API_KEY", "topsecret")
    s = Settings()  # type: ignore[call-arg]
    assert s.artifact_dir == tmp_path and s.max_k == 7 and s.api_key is not None
    assert "topsecret" not in repr(s)
    monkeypatch.delenv("NRS_ARTIFACT_DIR")
    with pytest.raises(ValidationError, match="artifact_dir"):
        Settings()  # type: ignore[call-arg]


def test_int8_models_and_gpu_fallback(artifacts):
    """use_int8 loads the quantized graphs; use_gpu without CUDA / FAISS GPU falls back to CPU."""
    import onnxruntime as ort

    settings = make_settings(artifacts.first, use_int8=True, use_gpu=True, warmup=False)
    with TestClient(create_app(settings)) as c:
        info = c.get("/info").json()
        assert {m["onnx_file"] for m in info["models"].values()} == {"model.int8.onnx"}
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            assert info["providers"] == ["CPUExecutionProvider"]
        for rerank in ("none", "colbert", "cross-encoder"):
            r = c.post("/search", json={"query": QUERIES[0], "k": 3, "rerank": rerank})
            assert r.status_code == 200 and len(r.json()["hits"]) == 3
    # int8 query encoders only (the cross-encoder stays fp32)
    settings = make_settings(artifacts.first, use_int8=True, int8_models="dense, colbert", warmup=False)
    with TestClient(create_app(settings)) as c:
        files = {kind: m["onnx_file"] for kind, m in c.get("/info").json()["models"].items()}
        assert files == {"dense": "model.int8.onnx", "colbert": "model.int8.onnx", "cross-encoder": "model.onnx"}
    with pytest.raises(ValueError, match="int8_models names unknown models"):
        make_settings(artifacts.first, use_int8=True, int8_models="dense,bert")


def test_colbert_tokens_in_memory(artifacts):
    """NRS_COLBERT_TOKENS=float32 / int8 decode the token index into RAM at start-up: the
    same ranking as the per-query decode (float32), int8 within its rounding."""
    body = {"query": QUERIES[2], "k": 10, "candidates": 30, "rerank": "colbert"}
    scores = {}
    for mode in ("compressed", "float32", "int8"):
        with TestClient(create_app(make_settings(artifacts.first, colbert_tokens=mode, colbert_weight=1.0))) as c:
            wait_ready(c)
            assert c.get("/info").json()["colbert_tokens"] == mode
            hits = c.post("/search", json=body).json()["hits"]
            scores[mode] = {h["id"]: h["score"] for h in hits}
    assert list(scores["float32"]) == list(scores["compressed"])
    for doc, score in scores["compressed"].items():
        assert scores["float32"][doc] == pytest.approx(score, abs=1e-4)
        if doc in scores["int8"]:
            assert scores["int8"][doc] == pytest.approx(score, abs=0.1)
    assert len(set(scores["int8"]) & set(scores["compressed"])) >= 8
    with pytest.raises(ValueError, match="colbert_tokens"):
        make_settings(artifacts.first, colbert_tokens="bfloat16")


@pytest.mark.parametrize("rerank", ["colbert", "cross-encoder"])
def test_rerank_interpolates_with_the_first_stage(artifacts, rerank):
    """Default weights come from the manifest (tuned by the builder); a configured weight of 1
    (NRS_COLBERT_WEIGHT / NRS_CROSS_ENCODER_WEIGHT) is the reranker's score alone, 0 keeps the
    first stage's order, 0.5 is the z-score mix."""
    from models.fusion import normalize
    from service.search import doc_full_text

    manifest = json.loads((artifacts.first / "manifest.json").read_text())
    section = manifest["indexes"]["colbert"] if rerank == "colbert" else manifest["models"]["cross-encoder"]
    tuned, setting, reported = section["interpolation"], rerank.replace("-", "_") + "_weight", \
        rerank.replace("-", "_") + "_weights"
    assert set(tuned["weights"]) == {"dense", "sparse", "hybrid"}
    assert all(0.0 <= w <= 1.0 for w in tuned["weights"].values())
    body = {"query": QUERIES[1], "k": 20, "candidates": 20, "rerank": rerank}
    with TestClient(create_app(make_settings(artifacts.first))) as c:
        wait_ready(c)
        assert c.get("/info").json()[reported] == tuned["weights"]
    results = {}
    for w in (0.0, 0.5, 1.0):
        with TestClient(create_app(make_settings(artifacts.first, **{setting: w}))) as c:
            wait_ready(c)
            assert c.get("/info").json()[reported] == dict.fromkeys(["dense", "sparse", "hybrid"], w)
            results[w] = c.post("/search", json=body).json()["hits"]
            engine = service_of(c).engine
            assert engine is not None
            if w == 1.0:  # the reranker's own score: MaxSim over the stored token vectors / the cross-encoder's
                idx = np.array([engine.docstore.ids.index(h["id"]) for h in results[w]])
                if rerank == "colbert":
                    assert engine.token_index is not None and engine.colbert_encoder is not None
                    q = engine.colbert_encoder.encode_queries([body["query"]])[0]
                    expected = engine.token_index.rerank(q, idx)
                else:
                    assert engine.cross_encoder is not None
                    docs = engine.docstore.get_by_index(idx.tolist())
                    expected = engine.cross_encoder.score(body["query"], [doc_full_text(d["title"], d["text"])
                                                                          for d in docs])
                np.testing.assert_allclose([h["score"] for h in results[w]], expected, rtol=1e-5, atol=1e-5)
    first = [h["first_stage_score"] for h in results[0.0]]
    assert first == sorted(first, reverse=True)  # weight 0: the first stage's order
    # weight 0.5: half the z-scores of each, over the same 20 candidates
    by_id = {h["id"]: h for h in results[1.0]}
    ids = [h["id"] for h in results[0.5]]
    assert set(ids) == set(by_id)
    own = np.array([by_id[i]["score"] for i in ids])
    first_scores = np.array([by_id[i]["first_stage_score"] for i in ids])
    expected = 0.5 * normalize(own) + 0.5 * normalize(first_scores)
    np.testing.assert_allclose([h["score"] for h in results[0.5]], expected, rtol=1e-4, atol=1e-4)
