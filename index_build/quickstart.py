"""A servable artifact in minutes, with no training: the packaged all-MiniLM-L6-v2 as the
dense model (its ONNX export), BM25, and the hybrid of the two served by default.

The full build (``index-build all``) distills students from a stronger teacher and tunes the
fusion on held-out queries; this one needs only a corpus and one corpus pass of a small
model, so a user can serve their own documents right away and build the rest later.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from index_build.data import Collection, load_collection, load_corpus

log = logging.getLogger(__name__)

#: the hybrid's weights without held-out queries to tune them on
EQUAL_WEIGHTS = {"method": "zscore", "dense_weight": 0.5, "sparse_weight": 0.5,
                 "tuned_on": "default (quickstart: no held-out queries)"}


def read_corpus(path: Path) -> Collection:
    """A BEIR folder, or a bare ``corpus.jsonl``-style file (queries and qrels not needed)."""
    path = Path(path)
    if path.is_file():
        return Collection(root=path.parent, docs=load_corpus(path), queries={}, qrels={})
    return load_collection(path)


def quickstart(data: Path, artifact_dir: Path, *, model: str = "packaged:minilm", max_doc_len: int = 256,
               threads: int = 0, cache_path: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Build a verified artifact at ``artifact_dir`` from the corpus at ``data``: ``model``
    encodes the documents (cached by content) and the queries at serving time, BM25 indexes
    the same texts, and requests that name no mode get the equal-weight hybrid of the two."""
    from index_build.cache import ArrayCache
    from index_build.package import build_artifact
    from index_build.teachers import BiEncoderTeacher
    from models.artifacts import verify
    from models.sources import cache_dir
    from models.sparse_index import BM25Index

    started = time.perf_counter()
    collection = read_corpus(data)
    texts = collection.doc_texts()
    log.info("quickstart: %d documents from %s; step 1/3: encode them with %s", len(texts), data, model)
    cache = ArrayCache(cache_path or cache_dir() / "arrays.sqlite")
    encoder = BiEncoderTeacher(model, texts, cache, max_doc_len=max_doc_len, threads=threads, progress=progress,
                               name=model)
    vectors = encoder.doc_embeddings
    stages = {"encode": round(time.perf_counter() - started, 1)}
    log.info("quickstart: step 2/3: BM25 index")
    bm25 = BM25Index.build(texts)
    stages["bm25"] = round(time.perf_counter() - started - sum(stages.values()), 1)
    log.info("quickstart: step 3/3: dense index, document store, manifest -> %s", artifact_dir)
    build_artifact(
        Path(artifact_dir), collection=collection, onnx_dirs={"dense": encoder.onnx_dir}, dense_vectors=vectors,
        bm25=bm25, hybrid=dict(EQUAL_WEIGHTS),
        serving={"default": {"first_stage": "hybrid", "rerank": "none", "chosen_on": "quickstart default"},
                 "dense_model": model},
        training={"quickstart": True, "dense_model": model, "distilled": False},
        build={"command": "index-build quickstart", "max_doc_len": max_doc_len}, progress=progress,
    )
    manifest = verify(Path(artifact_dir), deep=True)
    stages["artifact"] = round(time.perf_counter() - started - sum(stages.values()), 1)
    return {"artifact_dir": str(artifact_dir), "artifact_version": manifest.artifact_version,
            "n_docs": len(texts), "seconds": round(time.perf_counter() - started, 1), "stages": stages}
