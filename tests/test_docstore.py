from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from models.docstore import DocStore

DOCS = [(f"d{i}", f"title {i}", f"text of document {i} " * (i % 5 + 1)) for i in range(2000)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("docstore") / "docs.sqlite"
    built = DocStore.build(path, iter(DOCS))
    built.close()
    opened = DocStore.open(path)
    yield opened
    opened.close()


def test_build_writes_atomically_and_ids(store: DocStore) -> None:
    assert [p.name for p in store.path.parent.iterdir()] == ["docs.sqlite"]
    assert len(store) == 2000 and store.ids[:3] == ["d0", "d1", "d2"]
    assert store.ids_for([5, 0]) == ["d5", "d0"]
    assert store.index_of("d1234") == 1234 and store.index_of("missing") is None


def test_get_by_index_keeps_order_and_repeats(store: DocStore) -> None:
    wanted = [1999, 3, 3, 0, 1500] + list(range(100, 1100))  # > one SQL batch of parameters
    docs = store.get_by_index(wanted)
    assert [d["id"] for d in docs] == [f"d{i}" for i in wanted]
    assert docs[0] == {"id": "d1999", "title": "title 1999", "text": DOCS[1999][2]}
    assert store.get_by_index([]) == []
    with pytest.raises(IndexError):
        store.get_by_index([2000])


def test_read_only(store: DocStore) -> None:
    with pytest.raises(sqlite3.OperationalError):
        store._conn().execute("DELETE FROM docs")


def test_concurrent_reads(store: DocStore) -> None:
    def work(seed: int) -> bool:
        idx = [(seed * 37 + j * 11) % 2000 for j in range(50)]
        return [d["id"] for d in store.get_by_index(idx)] == [f"d{i}" for i in idx] and store.index_of(
            f"d{idx[0]}"
        ) == idx[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(work, range(200)))


def test_duplicate_id_leaves_nothing(tmp_path) -> None:
    path = tmp_path / "dup.sqlite"
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        DocStore.build(path, [("a", "", "x"), ("b", "", "y"), ("a", "", "z")])
    assert list(tmp_path.iterdir()) == []


def test_closed_store_and_missing_file(tmp_path) -> None:
    path = tmp_path / "one.sqlite"
    store = DocStore.build(path, [("x", "t", "body")])
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.get_by_index([0])
    with pytest.raises(FileNotFoundError):
        DocStore.open(tmp_path / "nope.sqlite")
