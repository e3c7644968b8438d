"""User errors of ``index-build`` read as one line on stderr with exit code 2; ``--debug``
shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "index_build.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('work_dir = "w"\n[teacher]\npool_dept = 3\n')
    broken = tmp_path / "broken.toml"
    broken.write_text('work_dir = "w"\n[teacher\npool_depth = 3\n')
    corpus = tmp_path / "latin1"
    corpus.mkdir()
    (corpus / "corpus.jsonl").write_bytes(b'{"_id": "a", "title": "t", "text": "ok"}\n'
                                          b'{"_id": "b", "title": "t", "text": "caf\xe9"}\n')
    return {"unknown": unknown, "broken": broken, "latin1": corpus, "missing": tmp_path / "no-such-folder"}


def test_missing_config(tmp_path):
    assert "no.toml not found" in one_line_error(run_cli("all", "--config", str(tmp_path / "no.toml")))


def test_unknown_key_in_config_and_in_set_says_did_you_mean(bad_files):
    for args in (["all", "--config", str(bad_files["unknown"])], ["all", "--set", "teacher.pool_dept=3"]):
        line = one_line_error(run_cli(*args))
        assert "unknown key 'teacher.pool_dept'" in line and "did you mean 'teacher.pool_depth'" in line


def test_broken_toml_names_file_line_and_column(bad_files):
    line = one_line_error(run_cli("all", "--config", str(bad_files["broken"])))
    assert str(bad_files["broken"]) in line and "line 2" in line and "column" in line


def test_non_utf8_corpus_names_file_and_line(bad_files):
    line = one_line_error(run_cli("check-data", str(bad_files["latin1"])))
    assert "corpus.jsonl:2: not valid UTF-8 (byte 0xe9" in line


def test_missing_data_folder(bad_files):
    line = one_line_error(run_cli("mine", "--set", f'data.path="{bad_files["missing"]}"'))
    assert "corpus file not found" in line


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "all", "--config", str(tmp_path / "no.toml"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    env = {**os.environ, "NRS_DEBUG": "1"}
    assert "Traceback" in run_cli("all", "--config", str(tmp_path / "no.toml"), env=env).stderr
