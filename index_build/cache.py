"""Content-keyed on-disk cache (SQLite key -> float32 array), so teacher scores and
embeddings are computed once and reruns are incremental."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def content_key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") if isinstance(p, str) else p)
        h.update(b"\x1f")
    return h.hexdigest()


class ArrayCache:
    """``key -> np.ndarray`` (float32, any shape) in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # builds sharing the user-level cache wait up to a minute for each other's writes
        self._conn = sqlite3.connect(str(self.path), timeout=60.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, shape TEXT, v BLOB)")
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                q = f"SELECT k, shape, v FROM kv WHERE k IN ({','.join('?' * len(chunk))})"
                for k, shape, v in self._conn.execute(q, chunk):
                    dims = tuple(int(x) for x in shape.split(",") if x)
                    out[k] = np.frombuffer(v, dtype=np.float32).reshape(dims)
        self.hits += len(out)
        self.misses += len(keys) - len(out)
        return out

    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        rows = [
            (k, ",".join(str(d) for d in a.shape), np.ascontiguousarray(a, dtype=np.float32).tobytes())
            for k, a in items
        ]
        with self._lock, self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM kv").fetchone()[0])

    def close(self) -> None:
        self._conn.close()
