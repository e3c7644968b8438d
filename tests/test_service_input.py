"""Malformed input: text that is not valid Unicode, invisible queries and loose types get a
4xx of their own and never fail the requests encoded in the same batch."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.text import QueryTextError, clean_query, has_visible_text
from service.app import create_app
from service.batching import EncodeBatcher
from service.search import EncodedQueries
from tests.service_fixtures import ServiceArtifacts, assert_envelope, build_service_artifacts, make_settings, wait_ready

SURROGATE_BODY = b'{"query": "heart \\ud800 disease"}'
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_beir, tiny_bert) -> ServiceArtifacts:
    return build_service_artifacts(tmp_path_factory, tiny_beir, tiny_bert)


@pytest.fixture(scope="module")
def client(artifacts) -> Iterator[TestClient]:
    # a wide batching window, so concurrent requests really share encode batches
    settings = make_settings(artifacts.first, batch_max_wait_ms=30.0, max_concurrency=16, max_queue=64,
                             max_batch_queries=4)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


# -- the text checks ------------------------------------------------------------------------------
def test_clean_query_rejects_surrogates_and_replaces_controls():
    with pytest.raises(QueryTextError, match=r"U\+DFFF at character 3"):
        clean_query("abc\udfffdef")
    assert clean_query("a\x00b\x1fc\x7fd\x85e") == "a b c d e"
    assert clean_query("tab\tand\nnewline") == "tab\tand\nnewline"
    assert clean_query("zero\u200bwidth") == "zero\u200bwidth"  # visible text around it: kept for the tokenizer
    for blank in ("", " \t\n", "\x00\x00", "\u200b\u200c\u200d\ufeff", "\u00ad\u2060 \u3000"):
        assert not has_visible_text(blank.replace("\x00", " "))
        with pytest.raises(QueryTextError, match="visible characters"):
            clean_query(blank)


# -- HTTP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_stage", ["dense", "sparse", "hybrid"])
def test_surrogate_query_is_422_naming_the_character(client, first_stage):
    body = SURROGATE_BODY.replace(b"}", b', "first_stage": "%s"}' % first_stage.encode())
    err = assert_envelope(client.post("/search", content=body, headers=JSON), 422, "invalid_request")
    assert "U+D800 at character 6" in err["message"]
    batch = b'{"queries": ["fine query", "heart \\ud800 disease"]}'
    err = assert_envelope(client.post("/search/batch", content=batch, headers=JSON), 422, "invalid_request")
    assert err["message"].startswith("queries[1]: ") and "U+D800" in err["message"]


@pytest.mark.parametrize("query", ["\u0000", "\u0000\u0000 \u0000", "\u200b\u200d", "\ufeff \u2060"])
def test_invisible_queries_are_422(client, query):
    err = assert_envelope(client.post("/search", json={"query": query}), 422, "invalid_request")
    assert "non-empty" in err["message"]


def test_control_characters_search_as_spaces(client):
    plain = client.post("/search", json={"query": "tumor growth", "k": 5}).json()
    noisy = client.post("/search", json={"query": "tumor\u0000growth\u0007", "k": 5})
    assert noisy.status_code == 200, noisy.text
    assert [h["id"] for h in noisy.json()["hits"]] == [h["id"] for h in plain["hits"]]


@pytest.mark.parametrize(("body", "field"), [
    ({"query": "q", "k": True}, "body.k"), ({"query": "q", "k": "5"}, "body.k"), ({"query": "q", "k": 2.5}, "body.k"),
    ({"query": "q", "candidates": "10"}, "body.candidates"), ({"query": "q", "nprobe": False}, "body.nprobe"),
    ({"query": "q", "include_text": 0}, "body.include_text"), ({"query": "q", "include_text": "yes"},
                                                               "body.include_text"),
])
def test_loose_types_are_rejected(client, body, field):
    assert field in assert_envelope(client.post("/search", json=body), 422, "validation_error")["message"]


def test_surrogate_queries_do_not_fail_their_batch_mates(client):
    """30 malformed queries sent beside 60 good ones, all at once: every good one gets its 200."""
    def send(i: int) -> tuple[bool, int]:
        if i % 3 == 0:
            return False, client.post("/search", content=SURROGATE_BODY, headers=JSON).status_code
        return True, client.post("/search", json={"query": f"heart disease risk {i}"}).status_code

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(send, range(90)))
    assert sorted({status for good, status in outcomes if good}) == [200]
    assert sorted({status for good, status in outcomes if not good}) == [422]


def test_a_failing_encode_fails_only_its_own_request(client, monkeypatch):
    """A text the encoder chokes on (past validation) fails alone: the batch is retried per request."""
    engine = client.app.state.service.engine  # type: ignore[attr-defined]
    real_encode = engine.encode

    def picky(kind, texts):
        if any("poison" in t for t in texts):
            raise TypeError("the tokenizer cannot take this text")
        return real_encode(kind, texts)

    monkeypatch.setattr(engine, "encode", picky)

    def send(i: int) -> tuple[bool, int]:
        query = "poison pill" if i % 4 == 0 else f"influenza vaccine {i}"
        return i % 4 != 0, client.post("/search", json={"query": query}).status_code

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(send, range(48)))
    assert sorted({status for good, status in outcomes if good}) == [200]
    assert sorted({status for good, status in outcomes if not good}) == [500]


def test_empty_x_api_key_does_not_hide_a_bearer_key(artifacts):
    with TestClient(create_app(make_settings(artifacts.first, api_key="s3cret-key", warmup=False))) as c:
        r = c.post("/search", json={"query": "tumor"}, headers={"X-API-Key": "", "Authorization": "Bearer s3cret-key"})
        assert r.status_code == 200, r.text
        assert_envelope(c.post("/search", json={"query": "tumor"}, headers={"X-API-Key": ""}), 401, "unauthorized")


# -- the batcher alone ----------------------------------------------------------------------------
class _PickyEngine:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, kind, texts):
        self.calls.append(list(texts))
        if any(t == "bad" for t in texts):
            raise TypeError("cannot encode 'bad'")
        return EncodedQueries(np.array([[float(len(t))] for t in texts], np.float32), 0.1, 0.2)


async def _direct(fn, *args):
    return fn(*args)


def test_batcher_retries_a_failed_batch_per_request():
    async def run():
        b = EncodeBatcher(_direct, max_size=16, max_wait_ms=50)
        b.start()
        engine = _PickyEngine()
        outcomes = await asyncio.gather(
            b.encode(engine, "dense", ["a"]), b.encode(engine, "dense", ["bad"]),
            b.encode(engine, "dense", ["ccc", "dd"]), return_exceptions=True)
        await b.close()
        return engine, outcomes

    engine, (first, bad, third) = asyncio.run(run())
    assert engine.calls[0] == ["a", "bad", "ccc", "dd"]  # batched first
    assert sorted(map(tuple, engine.calls[1:])) == [("a",), ("bad",), ("ccc", "dd")]  # then one call per request
    assert isinstance(bad, TypeError)
    assert first.vectors.tolist() == [[1.0]] and third.vectors.tolist() == [[3.0], [2.0]]


# -- clients that stall or leave mid-body -----------------------------------------------------------
def _post_scope(body_length: int) -> dict:
    return {"type": "http", "method": "POST", "path": "/search", "raw_path": b"/search", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(body_length).encode())],
            "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "http_version": "1.1",
            "root_path": "", "app": None}


def _call(app, receive) -> list[dict]:
    """Run one request through the ASGI app (middlewares first: no lifespan needed) and
    return what it sent."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    asyncio.run(app(_post_scope(100), receive, send))
    return sent


def test_client_leaving_mid_body_is_not_a_server_error(artifacts):
    from tests.service_fixtures import metric_value

    app = create_app(make_settings(artifacts.first))
    messages = iter([{"type": "http.request", "body": b'{"query": ', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    assert _call(app, receive) == []  # nobody to answer
    text = app.state.service.metrics.render()[0].decode()
    assert metric_value(text, "nrs_requests_total", route="unmatched", status="499", error_type="client_closed") == 1
    assert 'status="500"' not in text


def test_stalled_body_gets_408(artifacts):
    app = create_app(make_settings(artifacts.first, body_timeout_ms=200))
    first = True

    async def receive():  # 10 of the 100 declared bytes, then nothing
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b'{"query": ', "more_body": True}
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    started = time.perf_counter()
    sent = _call(app, receive)
    assert time.perf_counter() - started < 5
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["type"] == "body_timeout" and "after 10 bytes" in body["error"]["message"]
