from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.tiny import write_tiny_beir, write_tiny_bert

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NRS_SHARED_DATA", REPO.parent / "shared" / "data"))


_TEST_CACHE = pytest.StashKey[tempfile.TemporaryDirectory]()


@pytest.hookimpl(trylast=True)  # after ``-m`` deselected what will not run
def pytest_collection_modifyitems(session, config, items) -> None:
    """A run without real-weight tests keeps its model exports (tiny, content-keyed) in a
    temporary cache instead of ``~/.cache/neural-retrieval``; a slow run keeps the real cache,
    where the packaged mpnet is unpacked once."""
    if items and "NRS_CACHE_DIR" not in os.environ and not any(i.get_closest_marker("slow") for i in items):
        cache = config.stash[_TEST_CACHE] = tempfile.TemporaryDirectory(prefix="nrs-test-cache-")
        os.environ["NRS_CACHE_DIR"] = cache.name


def pytest_unconfigure(config) -> None:
    cache = config.stash.get(_TEST_CACHE, None)
    if cache is not None:
        os.environ.pop("NRS_CACHE_DIR", None)
        cache.cleanup()


@pytest.fixture(scope="session")
def tiny_beir(tmp_path_factory) -> Path:
    return write_tiny_beir(tmp_path_factory.mktemp("beir"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tiny_beir) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert"), tiny_beir)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set NRS_SHARED_DATA)")
    return SHARED_DATA


def tiny_overrides(data: Path, model: Path, root: Path, *extra: str) -> list[str]:
    """Config overrides that run the whole pipeline on the tiny corpus and model in seconds."""
    return [
        f'data.path="{data}"', f'work_dir="{root}/work"', f'cache_path="{root}/cache.sqlite"',
        f'artifact_dir="{root}/artifacts"',
        f'students.base="{model}"', "students.max_doc_len=64",
        f'teacher.members=[{{"kind":"bm25"}},{{"kind":"bi-encoder","model":"{model}"}}]',
        "teacher.pool_depth=20", "evaluate.trec_dl=[]", f'evaluate.results_dir="{root}/results"', *extra,
    ]
