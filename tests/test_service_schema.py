"""Schemathesis against the served OpenAPI schema (slow set): the real server process on
loopback, every check (`--checks all`), a bounded number of generated requests, valid and
invalid, for every operation. It passes when no response is a server error and every
response matches what the schema says."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service_fixtures import build_service_artifacts

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "admin-key-for-schemathesis"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_schemathesis_all_checks(tmp_path_factory, tiny_beir, tiny_bert, tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None, "schemathesis is not installed: pip install -e '.[dev]' (scripts/setup.sh does)"
    artifacts = build_service_artifacts(tmp_path_factory, tiny_beir, tiny_bert)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NRS_")}
    env.update(NRS_ARTIFACT_DIR=str(artifacts.first), NRS_PORT=str(port), NRS_THREADS="1", OMP_NUM_THREADS="1",
               NRS_MAX_BATCH_QUERIES="8", NRS_MAX_QUERY_CHARS="256", NRS_ADMIN_KEY=ADMIN_KEY,
               NRS_ARTIFACT_ROOT=str(artifacts.first.parent), NRS_LOG_LEVEL="warning", PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"the service did not become ready: {server.stderr.read() if server.stderr else ''}")
        report = tmp_path / "schemathesis.txt"
        proc = subprocess.run(
            [cli, "run", f"{base}/openapi.json", "--checks", "all", "--max-examples", "100", "--seed", "7",
             "--header", f"X-API-Key: {ADMIN_KEY}", "--no-color"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path,
        )
        report.write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
