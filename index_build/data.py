"""BEIR-layout loader with validation.

A BEIR collection is a folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (header
``query-id  corpus-id  score``). Every problem is reported with the file and line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from models.retrieval import doc_full_text

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Malformed collection input; the message names the file and line."""


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """Title and text joined the way every model in the project sees a document."""
        return doc_full_text(self.title, self.text)


@dataclass
class Collection:
    """A corpus with optional queries and qrels (``qrels[split][qid][docid] = grade``)."""

    root: Path
    docs: list[Doc]
    queries: dict[str, str] = field(default_factory=dict)
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.doc_index = {d.id: i for i, d in enumerate(self.docs)}

    @property
    def doc_ids(self) -> list[str]:
        return [d.id for d in self.docs]

    def doc_texts(self) -> list[str]:
        return [d.full_text for d in self.docs]

    def split_queries(self, split: str) -> dict[str, str]:
        """Queries that have judgments in ``split`` (order of the queries file)."""
        judged = self.qrels.get(split, {})
        return {qid: text for qid, text in self.queries.items() if qid in judged}

    def checksum(self) -> str:
        """Content hash of the corpus (ids, titles, texts), independent of file layout."""
        h = hashlib.sha256()
        for d in self.docs:
            for part in (d.id, d.title, d.text):
                h.update(part.encode("utf-8"))
                h.update(b"\x00")
        return h.hexdigest()

    @property
    def has_labels(self) -> bool:
        return bool(self.queries) and bool(self.qrels)


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file; a line that is not UTF-8 is a
    :class:`DataError` naming the file, line and column."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _required_str(obj: dict, key: str, path: Path, lineno: int, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{path}:{lineno}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, int) and key == "_id":
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{path}:{lineno}: field {key!r} is empty")
    return value


def load_corpus(path: Path) -> list[Doc]:
    docs: list[Doc] = []
    seen: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        doc_id = _required_str(obj, "_id", path, lineno)
        if doc_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate document id {doc_id!r} (first seen on line {seen[doc_id]})")
        seen[doc_id] = lineno
        title = obj.get("title") or ""
        if not isinstance(title, str):
            raise DataError(f"{path}:{lineno}: field 'title' must be a string")
        text = _required_str(obj, "text", path, lineno, allow_empty=True)
        if not (title.strip() or text.strip()):
            # real collections have a few (Cranfield: 2); keep them so qrels stay valid
            log.warning("%s:%d: document %r has neither title nor text", path, lineno, doc_id)
        docs.append(Doc(doc_id, title.strip(), text.strip()))
    if not docs:
        raise DataError(f"{path}: corpus is empty")
    return docs


def load_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        qid = _required_str(obj, "_id", path, lineno)
        if qid in queries:
            raise DataError(f"{path}:{lineno}: duplicate query id {qid!r} (first seen on line {lines[qid]})")
        queries[qid] = _required_str(obj, "text", path, lineno).strip()
        lines[qid] = lineno
    return queries


def normalize_query(text: str) -> str:
    """A query with its whitespace runs folded to single spaces: how a query log's texts
    are compared with the collection's queries."""
    return " ".join(text.split())


def query_key(text: str) -> str:
    """What decides that two queries are the same one (a logged query and an evaluated one):
    the normalized text, case-folded, as the uncased encoders read it.

    >>> query_key("  Does  TNF cause fever? ") == query_key("does tnf cause fever?")
    True
    """
    return normalize_query(text).casefold()


#: the files of a query-log folder that are read (the service's rotated parts among them)
QUERY_LOG_SUFFIXES = (".jsonl", ".tsv", ".txt")


def query_log_files(path: str | Path) -> list[Path]:
    """The files a query log is read from: ``path`` itself, or, for a folder (the service's
    ``NRS_QUERY_LOG_PATH`` with its rotated parts), each ``.jsonl``/``.tsv``/``.txt`` file
    in it, by name. A missing path or a folder with none of them is a :class:`DataError`."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in QUERY_LOG_SUFFIXES)
        if not files:
            raise DataError(f"query log folder {path} holds no {'/'.join(QUERY_LOG_SUFFIXES)} file")
        return files
    if not path.is_file():
        raise DataError(f"query log {path} not found")
    return [path]


def _query_log_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return [_required_str(obj, "text", path, lineno, allow_empty=True) for lineno, obj in _iter_jsonl(path)]
    texts = []
    for lineno, line in text_lines(path):
        line = line.rstrip("\r\n")
        if path.suffix == ".tsv" and line.strip():
            if "\t" not in line:
                raise DataError(f"{path}:{lineno}: expected id<TAB>text")
            line = line.split("\t", 1)[1]
        texts.append(line)
    return texts


def load_query_log(path: str | Path) -> list[str]:
    """The distinct query texts of a query log, in file order: a BEIR ``queries.jsonl`` (its
    ``text`` fields, as the service's query log writes them), a ``.tsv`` of ``id<TAB>text``
    lines (MS MARCO's ``queries.tsv``), any other text file with one query a line, or a
    folder of such files (:func:`query_log_files`). Queries that differ only in case or
    spacing (:func:`query_key`) are one query, in its first form. Blank queries are skipped; a
    missing or empty log, or a malformed line, is a :class:`DataError`."""
    texts = [normalize_query(t) for f in query_log_files(path) for t in _query_log_texts(f) if t.strip()]
    first: dict[str, str] = {}
    for t in texts:
        first.setdefault(query_key(t), t)
    out = list(first.values())
    if not out:
        raise DataError(f"query log {path} holds no query")
    return out


def query_log_checksum(path: str | Path) -> str:
    """The SHA-256 of a query log's bytes (the mine stage's key holds it); for a folder, of
    each file's name and SHA-256."""
    from models.artifacts import sha256_file

    files = query_log_files(path)
    if not Path(path).is_dir():
        return sha256_file(path)
    return hashlib.sha256("".join(f"{f.name}\t{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def load_qrels(path: Path, doc_ids: set[str], query_ids: set[str] | None = None, *,
               unknown_docs: str = "error") -> dict[str, dict[str, int]]:
    """``unknown_docs``: "error" (default), or "keep" for a candidate-pool corpus (TREC DL),
    whose judged passages need not all be in the pool: they are kept, so nDCG's ideal
    ranking counts them as trec_eval does (one warning gives their number)."""
    qrels: dict[str, dict[str, int]] = {}
    outside = 0
    for lineno, line in text_lines(path):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if lineno == 1 and parts[0].strip().lower() in {"query-id", "query_id", "qid"}:
            continue
        if len(parts) == 4:  # TREC qrels: qid iter docid grade
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise DataError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(parts)}")
        qid, did, grade_s = (p.strip() for p in parts)
        try:
            grade = int(float(grade_s))
        except ValueError:
            raise DataError(f"{path}:{lineno}: relevance grade {grade_s!r} is not a number") from None
        if did not in doc_ids:
            if unknown_docs != "keep":
                raise DataError(f"{path}:{lineno}: qrels point at unknown document {did!r}")
            outside += 1
        if query_ids is not None and qid not in query_ids:
            raise DataError(f"{path}:{lineno}: qrels point at unknown query {qid!r}")
        qrels.setdefault(qid, {})[did] = grade
    if outside:
        log.warning("%s: %d judgments name documents outside this (pool) corpus", path, outside)
    return qrels


def load_collection(root: str | Path, *, splits: list[str] | None = None, unknown_docs: str = "error") -> Collection:
    """Load a BEIR folder. Queries and qrels are optional (a bare corpus is valid).
    ``unknown_docs="keep"`` accepts qrels of documents outside a candidate-pool corpus."""
    root = Path(root)
    corpus_path = root / "corpus.jsonl"
    if not corpus_path.is_file():
        raise DataError(f"{corpus_path}: corpus file not found")
    docs = load_corpus(corpus_path)
    queries_path = root / "queries.jsonl"
    queries = load_queries(queries_path) if queries_path.is_file() else {}
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    qrels_dir = root / "qrels"
    if qrels_dir.is_dir() and queries:
        doc_ids = {d.id for d in docs}
        for tsv in sorted(qrels_dir.glob("*.tsv")):
            if splits is not None and tsv.stem not in splits:
                continue
            qrels[tsv.stem] = load_qrels(tsv, doc_ids, set(queries), unknown_docs=unknown_docs)
    return Collection(root=root, docs=docs, queries=queries, qrels=qrels)


def load_trec_run(path: str | Path, depth: int | None = None) -> dict[str, list[tuple[str, float]]]:
    """Read a TREC run file (``qid Q0 docid rank score tag``) into ranked lists."""
    path = Path(path)
    run: dict[str, list[tuple[str, float]]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 6:
                raise DataError(f"{path}:{lineno}: expected 6 columns in a TREC run line")
            try:
                score = float(parts[4])
            except ValueError:
                raise DataError(f"{path}:{lineno}: score {parts[4]!r} is not a number") from None
            run.setdefault(parts[0], []).append((parts[2], score))
    for qid, hits in run.items():
        hits.sort(key=lambda h: -h[1])
        if depth is not None:
            run[qid] = hits[:depth]
    return run
