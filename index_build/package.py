"""Assemble a self-describing artifact directory that the online service loads.

Layout (all paths relative to the artifact root, all listed with checksums in the manifest)::

    manifest.json
    models/<kind>/{model.onnx, model.int8.onnx, tokenizer.json, encoder.json}
    dense/index.faiss          FAISS IVF-PQ (or flat) over the dense student's vectors
    colbert/                   ColBERT token index (residual-compressed token vectors)
    bm25/                      bm25s index (sparse / hybrid first stage)
    docs.sqlite                document store (ids, titles, texts)

The directory is written into a temporary sibling and renamed into place (see
:class:`models.artifacts.ArtifactWriter`), so a crashed build never leaves a directory
that looks complete.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index_build.data import Collection
from index_build.distill_vq import DistillVQConfig, distill, index_parts
from models.encoders import CONFIG_NAME, ONNX_NAME, QUERY_TOKEN_MAPS, TOKENIZER_NAME
from models.token_index import KMEANS_NITER

if TYPE_CHECKING:
    from index_build.context import BuildContext

INT8_NAME = "model.int8.onnx"
log = logging.getLogger(__name__)


def build_artifact(
    final_dir: Path,
    *,
    collection: Collection,
    onnx_dirs: dict[str, Path],
    dense_vectors: np.ndarray,
    colbert_vectors: list[np.ndarray] | None = None,
    bm25=None,
    factory: str | None = None,
    colbert_bits: int | None = 2,
    colbert_kmeans_niter: int = KMEANS_NITER,
    nprobe: int | None = None,
    calibration_queries: np.ndarray | None = None,
    hybrid: dict[str, Any] | None = None,
    rerank_interpolation: dict[str, dict[str, Any]] | None = None,
    distill_vq: DistillVQConfig | None = None,
    distill_vq_queries: tuple[np.ndarray, dict[str, Any]] | None = None,
    training: dict[str, Any] | None = None,
    build: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
    query_token_map: dict[str, Any] | None = None,
    hybrid_query_token_map: dict[str, Any] | None = None,
    progress: bool = False,
) -> Path:
    from models.artifacts import ArtifactWriter
    from models.dense_index import DenseIndex
    from models.docstore import DocStore
    from models.token_index import TokenIndex

    if len(dense_vectors) != len(collection.docs):
        raise ValueError(f"{len(dense_vectors)} dense vectors for {len(collection.docs)} documents")
    models: dict[str, dict[str, Any]] = {}
    indexes: dict[str, dict[str, Any]] = {}
    interpolation = rerank_interpolation or {}  # per reranker: its dev-tuned weights per first stage
    with ArtifactWriter(Path(final_dir)) as w:
        root = w.path
        for kind, src in onnx_dirs.items():
            dst = root / "models" / kind
            dst.mkdir(parents=True)
            for name in (ONNX_NAME, INT8_NAME, TOKENIZER_NAME, CONFIG_NAME):
                if (src / name).is_file():
                    shutil.copyfile(src / name, dst / name)
            enc = json.loads((src / CONFIG_NAME).read_text())
            models[kind] = {**enc, "path": f"models/{kind}", "onnx_file": ONNX_NAME,
                            "int8_onnx_file": INT8_NAME if (src / INT8_NAME).is_file() else None,
                            "tokenizer_file": TOKENIZER_NAME}
        # ColBERT's query tokens from the pass of the query encoder that served the first
        # stage: the dense model's, and the hybrid model's after the hybrid (one pass a query)
        for source, token_map in (("dense", query_token_map), ("hybrid", hybrid_query_token_map)):
            entry, file = QUERY_TOKEN_MAPS[source]
            if token_map is not None and "colbert" in models and source in models:
                np.save(root / "models" / "colbert" / file, np.asarray(token_map["map"], np.float32))
                models["colbert"][entry] = {"file": file, "from": source,
                                            **{k: v for k, v in token_map.items() if k != "map"}}
        dense = DenseIndex.build(dense_vectors, factory, progress=progress)
        trained_by = train_dense_index(dense, dense_vectors, distill_vq, distill_vq_queries, progress)
        calibration: dict[str, Any] | None = None
        if nprobe:
            dense.default_nprobe = nprobe
            calibration = {"method": "configured"}
        elif dense.is_ivf and calibration_queries is not None and len(calibration_queries):
            calibration = dense.calibrate_nprobe(dense_vectors, calibration_queries)
        dense.save(root / "dense" / "index.faiss")
        indexes["dense"] = {"type": "faiss", "path": "dense/index.faiss", "model": "dense", **dense.params(),
                            "bytes_per_vector": dense.bytes_per_vector(), "trained_by": trained_by}
        if calibration is not None:
            indexes["dense"]["nprobe_calibration"] = calibration
        if colbert_vectors is not None:
            tok = TokenIndex.build(colbert_vectors, root / "colbert", bits=colbert_bits,
                                   kmeans_niter=colbert_kmeans_niter, progress=progress)
            indexes["colbert"] = {"type": "colbert-token-index", "path": "colbert", "model": "colbert",
                                  **tok.params(), "bytes_per_token": tok.bytes_per_token()}
            if interpolation.get("colbert") is not None:
                indexes["colbert"]["interpolation"] = interpolation["colbert"]
        if bm25 is not None:
            bm25.save(root / "bm25")
            indexes["bm25"] = {"type": "bm25s", "path": "bm25", **bm25.config.__dict__}
        if hybrid is not None:
            indexes["hybrid"] = {"type": "fusion", "members": ["dense", "bm25"], **hybrid}
        if "cross-encoder" in models and interpolation.get("cross-encoder") is not None:
            models["cross-encoder"]["interpolation"] = interpolation["cross-encoder"]
        DocStore.build(root / "docs.sqlite", ((d.id, d.title, d.text) for d in collection.docs), progress=progress)
        return w.finalize({
            "corpus": {"checksum": collection.checksum(), "n_docs": len(collection.docs),
                       "source": str(collection.root)},
            "models": models,
            "indexes": indexes,
            "docstore": {"path": "docs.sqlite"},
            "training": training or {},
            "build": build or {},
            "serving": serving or {},
        })


def train_dense_index(dense, vectors: np.ndarray, cfg: DistillVQConfig | None,
                      queries: tuple[np.ndarray, dict[str, Any]] | None, progress: bool) -> dict[str, Any]:
    """Optionally re-learn ``dense``'s IVF centroids and PQ codebooks with Distill-VQ (in
    place); returns the manifest's record of how the index was trained."""
    if cfg is None or not cfg.enabled:
        return {"method": "faiss"}
    try:
        index_parts(dense.index)
    except ValueError as e:
        log.warning("distill-vq skipped: %s", e)
        return {"method": "faiss", "distill_vq_skipped": str(e)}
    if queries is None or not len(queries[0]):
        raise ValueError("distill-vq is enabled but no queries were given to train it")
    vectors_q, about = queries
    return {**distill(dense.index, vectors, vectors_q, cfg, progress=progress), "queries": about}


# -- the artifact stage ---------------------------------------------------------------------------
def artifact_stage(ctx: BuildContext, final: Path, key: str, records: Mapping[str, Any],
                   config: dict[str, Any]) -> dict:
    """Build the artifact into ``final``: the served dense model's document vectors indexed
    (:func:`build_artifact`), ColBERT tokens, BM25, the dev-tuned weights and default mode,
    the build's records (``records``: the stage records by name; ``config``: the build
    configuration as JSON); verified before it is reported."""
    from index_build.context import HYBRID_HEAD
    from index_build.tune import choose_default, tune_hybrid, tune_rerank_weights
    from models.artifacts import verify

    kinds = ctx.cfg.students.kinds
    served = ctx.served_dense
    if served not in kinds:
        raise RuntimeError("an artifact needs a dense student (students.kinds must include 'dense' "
                           "or 'asymmetric')")
    dense = ctx.corpus_vectors()
    colbert = None
    if "colbert" in kinds:
        toks = ctx.colbert_corpus()
        colbert = [toks[i] for i in range(len(ctx.corpus_texts))]
    stages = {n: {"seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes}
              for n, r in records.items()}
    hybrid = tune_hybrid(ctx)
    ev = ctx.cfg.evaluate
    # the cross-encoder's weight is tuned at the depth it is served at
    depths = {"colbert": 100, "cross-encoder": ev.served_cross_encoder_depth}
    # the pair length the cross-encoder reads when served (its training length at most)
    ce_max_len = min(ev.cross_encoder_max_len or ctx.cfg.students.max_doc_len, ctx.cfg.students.max_doc_len)
    interpolation: dict[str, dict[str, Any]] = {
        k: tune_rerank_weights(ctx, k, hybrid["dense_weight"], depth) for k, depth in depths.items() if k in kinds}
    training: dict[str, Any] = {
        "label_free": ctx.label_free, "teacher": ctx.cfg.teacher.members,
        "students": {k: records[f"distill-{k}"].result for k in kinds if f"distill-{k}" in records},
        "wise_ft": {k: ctx.wise_ft(k) for k in kinds},
    }
    if "head-asymmetric" in records:
        training["hybrid_head"] = records["head-asymmetric"].result
    if ctx.label_free and "mine" in records:
        training["pseudo_queries"] = records["mine"].result
    dvq = ctx.cfg.index.distill_vq
    distill_vq = distill_vq_queries(ctx, dvq.queries, dvq.max_queries) if dvq.enabled else None
    build_artifact(
        final, collection=ctx.collection,
        # the served dense model is the artifact's "dense" model (a full-tower student
        # beside an asymmetric one is evaluated, not served)
        onnx_dirs={"dense": ctx.onnx_dir(served),
                   **{k: ctx.onnx_dir(k) for k in ("colbert", "cross-encoder") if k in kinds},
                   # the query encoder of the hybrid's dense parts, where it is not the dense model
                   **({"hybrid": ctx.onnx_dir(HYBRID_HEAD)} if ctx.hybrid_head() is not None else {})},
        dense_vectors=dense, colbert_vectors=colbert, bm25=ctx.bm25, factory=ctx.cfg.index.factory,
        colbert_bits=ctx.cfg.index.colbert_bits, colbert_kmeans_niter=ctx.cfg.index.colbert_kmeans_niter,
        nprobe=ctx.cfg.index.nprobe,
        calibration_queries=calibration_queries(ctx), hybrid=hybrid, rerank_interpolation=interpolation,
        distill_vq=dvq, distill_vq_queries=distill_vq,
        serving={"default": choose_default(ctx), "dense_model": served,
                 "hybrid_model": "hybrid" if ctx.hybrid_head() is not None else "dense",
                 **({"cross_encoder": {"depth": depths["cross-encoder"], "max_len": ce_max_len}}
                    if "cross-encoder" in kinds else {})},
        training=training,
        query_token_map=ctx.query_token_map() if ctx.one_pass else None,
        hybrid_query_token_map=(ctx.query_token_map(HYBRID_HEAD)
                                if ctx.colbert_query_source("hybrid") == HYBRID_HEAD else None),
        build={"key": key, "config": config, "stages": stages},
        progress=ctx.progress,
    )
    manifest = verify(final, deep=True)
    return {"artifact_dir": str(final), "artifact_version": manifest.artifact_version}



def training_query_texts(ctx: BuildContext) -> list[str]:
    """The training queries (pseudo-queries on a label-free build), train and dev slices,
    deduplicated and shuffled with a fixed seed; never test queries."""
    mined = ctx.load_mined()
    texts = list(dict.fromkeys([e.query for e in mined["examples"]] + list(mined["dev"]["queries"])))
    random.Random(0).shuffle(texts)
    return texts


def calibration_queries(ctx: BuildContext, limit: int = 512) -> np.ndarray:
    """Dense-student vectors of up to ``limit`` training (or pseudo-) queries, for choosing
    the default ``nprobe``."""
    return ctx.dense_queries(training_query_texts(ctx)[:limit])


def distill_vq_queries(ctx: BuildContext, source: str, limit: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Dense-student vectors of the queries that train a distilled index, and a record of
    them. ``auto``: :func:`training_query_texts`; ``pseudo``: titles and the two most
    informative sentences of every document (no queries or labels at all)."""
    from index_build.pseudo_queries import Generator, SentenceGenerator, TitleGenerator

    if source == "pseudo":
        docs = ctx.collection.docs
        generators: list[Generator] = [TitleGenerator(), SentenceGenerator(per_doc=2)]
        texts = list(dict.fromkeys(p.text for g in generators for p in g.generate(docs)))
        random.Random(0).shuffle(texts)
        origin = "pseudo-queries: document titles and sentences"
    else:
        texts = training_query_texts(ctx)
        origin = "label-free pseudo-queries" if ctx.label_free else "training queries (train and dev slices)"
    texts = texts[:limit]
    log.info("distill-vq: encoding %d queries (%s)", len(texts), origin)
    return ctx.dense_queries(texts), {"source": source, "origin": origin, "n_queries": len(texts)}

