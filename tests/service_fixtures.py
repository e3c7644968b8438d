"""Shared pieces of the service tests: one tiny artifact (plus a second version of it for
hot reload) built once per test session, settings and client helpers."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from fastapi.testclient import TestClient

from models.artifacts import ArtifactWriter, load_manifest
from service.settings import Settings
from tests.conftest import tiny_overrides


class ServiceArtifacts(NamedTuple):
    first: Path
    second: Path  # same content plus one file: another artifact_version


def derive_artifact(src: Path, dst: Path, note: str) -> Path:
    """A copy of ``src`` with one extra file, written as a new artifact (new version)."""
    manifest = load_manifest(src)
    with ArtifactWriter(dst) as w:
        shutil.copytree(src, w.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        (w.path / "NOTE.txt").write_text(note + "\n")
        fields = manifest.model_dump(
            mode="json", exclude={"files", "artifact_version", "schema_version", "created_at", "versions"}
        )
        w.finalize(fields)
    return dst


def build_service_artifacts(
    tmp_path_factory: pytest.TempPathFactory, tiny_beir: Path, tiny_bert: Path
) -> ServiceArtifacts:
    """Run the tiny build pipeline once per session (cached under the session's base temp dir,
    so every test module using it shares one build)."""
    base = tmp_path_factory.getbasetemp() / "service-artifacts"
    first, second = base / "artifacts", base / "artifacts-v2"
    if not (second / "manifest.json").is_file():
        from index_build.config import load_config
        from index_build.stages import Pipeline

        cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, base))
        Pipeline(cfg, progress=False).run_all()
        derive_artifact(first, second, "second build of the same corpus")
    return ServiceArtifacts(first, second)


def make_settings(artifact_dir: Path, **overrides: Any) -> Settings:
    """Test settings: one ORT thread, a short batching window."""
    values: dict[str, Any] = {"artifact_dir": artifact_dir, "threads": 1, "batch_max_wait_ms": 1.0}
    values.update(overrides)
    return Settings(**values)


def wait_ready(client: TestClient, timeout_s: float = 20.0) -> None:
    """Poll ``/ready`` until 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout_s} s: {client.get('/ready').json()}")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def slowed(fn: Callable[..., Any], delay_s: float) -> Callable[..., Any]:
    """``fn`` that sleeps ``delay_s`` first (runs in the worker thread, like the real work)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay_s)
        return fn(*args, **kwargs)

    return wrapper


def held(fn: Callable[..., Any], release: threading.Event, timeout_s: float = 60.0) -> Callable[..., Any]:
    """``fn`` that first waits until ``release`` is set (in the worker thread): a request kept
    in flight for exactly as long as a test needs, however slow the machine."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        release.wait(timeout_s)
        return fn(*args, **kwargs)

    return wrapper


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Value of one sample in Prometheus text (``None`` if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_str = head.partition("{")
        if metric != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_str.rstrip("}").split(",") if "=" in part
        )
        found = {k: v.strip('"') for k, v in found.items()}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def assert_envelope(response: Any, status: int, error_type: str | None = None) -> dict[str, str]:
    """The response is ``status`` with exactly the error envelope; returns ``error``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if error_type is not None:
        assert body["error"]["type"] == error_type, body
    assert "Traceback" not in response.text
    return body["error"]
