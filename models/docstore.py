"""SQLite document store: ids, titles and texts by corpus index, without loading the texts.

One table, ``docs(idx INTEGER PRIMARY KEY, id TEXT UNIQUE, title TEXT, text TEXT)``, where
``idx`` is the document's row number in corpus order (= the FAISS / token index id).
The store is opened read-only; each thread gets its own SQLite connection, so concurrent
reads from a thread pool neither block on one another nor share a cursor.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote

_SCHEMA = "CREATE TABLE docs (idx INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, title TEXT, text TEXT)"
_BATCH = 10_000
_MAX_VARS = 900  # stay under SQLite's bound-parameter limit on old builds


class DocStore:
    """Read-only access to a document store written by :meth:`build`.

    Attributes
    ----------
    ids
        Every document id in corpus order (loaded once on open; ids are short).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: document store missing")
        self._uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        rows = self._conn().execute("SELECT idx, id FROM docs ORDER BY idx").fetchall()
        if any(i != row[0] for i, row in enumerate(rows)):
            raise ValueError(f"{self.path}: docs.idx is not 0..n-1")
        self.ids: list[str] = [row[1] for row in rows]

    # -- build / open -------------------------------------------------------------------------
    @classmethod
    def build(cls, path: Path, docs: Iterable[tuple[str, str, str]], progress: bool = False) -> DocStore:
        """Write ``(id, title, text)`` tuples (corpus order) to ``path``.

        The database is written to ``path + ".tmp"`` and moved into place with
        ``os.replace``; a duplicate id raises ``ValueError`` and leaves ``path`` untouched.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)
        items: Iterable[tuple[str, str, str]] = docs
        if progress:
            from tqdm import tqdm

            items = tqdm(docs, desc="docstore", unit="doc")
        conn = sqlite3.connect(str(tmp))
        try:
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute(_SCHEMA)
            batch: list[tuple[int, str, str, str]] = []
            seen: set[str] = set()
            for idx, (doc_id, title, text) in enumerate(items):
                doc_id = str(doc_id)
                if doc_id in seen:
                    raise ValueError(f"{path}: duplicate document id {doc_id!r} (document {idx})")
                seen.add(doc_id)
                batch.append((idx, doc_id, title or "", text or ""))
                if len(batch) >= _BATCH:
                    _insert(conn, batch)
                    batch = []
            _insert(conn, batch)
            conn.commit()
            conn.close()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            conn.close()
            tmp.unlink(missing_ok=True)
            raise
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> DocStore:
        """Open an existing store read-only."""
        return cls(path)

    # -- reads --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError(f"{self.path}: document store is closed")
            conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
            with self._lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def get_by_index(self, indices: Sequence[int]) -> list[dict[str, str]]:
        """``{"id", "title", "text"}`` per index, in the given order (repeats allowed).

        Raises ``IndexError`` for an index outside ``[0, len(self))``.
        """
        wanted = [int(i) for i in indices]
        for i in wanted:
            if not 0 <= i < len(self.ids):
                raise IndexError(f"document index {i} out of range [0, {len(self.ids)})")
        unique = sorted(set(wanted))
        found: dict[int, dict[str, str]] = {}
        conn = self._conn()
        for start in range(0, len(unique), _MAX_VARS):
            part = unique[start : start + _MAX_VARS]
            marks = ",".join("?" * len(part))
            query = f"SELECT idx, id, title, text FROM docs WHERE idx IN ({marks})"
            for idx, doc_id, title, text in conn.execute(query, part):
                found[idx] = {"id": doc_id, "title": title, "text": text}
        return [dict(found[i]) for i in wanted]

    def ids_for(self, indices: Sequence[int]) -> list[str]:
        """Document ids of ``indices`` (from memory, no query)."""
        return [self.ids[int(i)] for i in indices]

    def index_of(self, doc_id: str) -> int | None:
        """Corpus index of ``doc_id``, or ``None`` if absent."""
        row = self._conn().execute("SELECT idx FROM docs WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else int(row[0])

    def __len__(self) -> int:
        return len(self.ids)

    def close(self) -> None:
        """Close every thread's connection; later reads raise ``RuntimeError``."""
        with self._lock:
            self._closed = True
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> DocStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DocStore({self.path}, n_docs={len(self)})"


def _insert(conn: sqlite3.Connection, batch: list[tuple[int, str, str, str]]) -> None:
    if batch:
        conn.executemany("INSERT INTO docs (idx, id, title, text) VALUES (?, ?, ?, ?)", batch)
