"""The baseline: what a user would otherwise write to serve the same students, for a
side-by-side load test (``benchmarks/load.py --compare``).

A FastAPI app with the same ``/search`` request and response shapes as the service
(:mod:`service.schemas`), backed by the builder's distilled **PyTorch** students instead of
the ONNX exports and compressed indexes:

- query encoding: the torch student the artifact serves as its dense model
  (:attr:`index_build.stages.Pipeline.served_dense`: the asymmetric query encoder or the
  full-tower student, ``work/<corpus>/distill-<kind>/student``,
  :func:`index_build.students.load_student`, WiSE-FT-interpolated with the base as the
  builder exports it);
- first stage: exact inner product in a FAISS ``IndexFlatIP`` over the builder's float32
  corpus vectors (:meth:`index_build.stages.Pipeline.corpus_vectors`: the teacher members'
  document vectors for the asymmetric student, the full-tower student's own encodings
  otherwise; the same vectors the IVF-PQ index of the artifact compresses);
- ``rerank=colbert``: the torch ColBERT student encodes the query, MaxSim in torch over the
  float32 token vectors of the candidates (:meth:`Pipeline.colbert_corpus`, uncompressed),
  mixed with the first-stage scores at the builder's dev-tuned weight, as the service does;
- ``rerank=cross-encoder``: the torch cross-encoder student over (query, document) pairs in
  batches of 32, mixed with the first-stage scores in the same way.

Endpoints are plain ``def`` functions (FastAPI runs them in its thread pool), one process,
no batching, no admission control: the obvious implementation. ``/ready`` answers 200 once
everything is loaded. Only ``first_stage="dense"`` is supported.

Run::

    .venv/bin/python benchmarks/baseline_service.py --config configs/scifact.toml --port 8100 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request

from models.fusion import interpolate
from service.schemas import SearchRequest, SearchResponse

log = logging.getLogger("benchmarks.baseline_service")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class BaselineEngine:
    """The torch students, a flat FAISS index and float32 ColBERT token vectors of one build."""

    def __init__(self, config: Path | None, overrides: Sequence[str] = (), threads: int = 1) -> None:
        import faiss
        import torch

        from index_build.config import load_config
        from index_build.stages import Pipeline
        from index_build.students import interpolate_with_base, load_student
        from models.artifacts import load_manifest
        from models.sources import resolve_model

        started = time.perf_counter()
        if threads > 0:
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
        cfg = load_config(config, list(overrides))
        pipeline = Pipeline(cfg, progress=False)
        work = Path(cfg.work_dir)
        kinds = cfg.students.kinds

        def student(kind: str) -> Any:
            """The distilled student as the builder exports it (WiSE-FT interpolation included)."""
            path = work / f"distill-{kind}" / "student"
            if not (path / "encoder.json").is_file():
                raise FileNotFoundError(f"{path}: no distilled {kind} student (run `index-build all` first)")
            model = load_student(path)
            alpha = pipeline.wise_ft(kind)
            if alpha != 1.0:
                model = interpolate_with_base(model, resolve_model(cfg.students.base), alpha)
            return model.eval()

        self.dense = student(pipeline.served_dense)
        self.colbert = student("colbert") if "colbert" in kinds else None
        self.cross_encoder = student("cross-encoder") if "cross-encoder" in kinds else None
        self.ids: list[str] = list(pipeline.collection.doc_ids)
        self.texts: list[str] = list(pipeline.corpus_texts)
        vectors = np.ascontiguousarray(pipeline.corpus_vectors(), dtype=np.float32)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.doc_tokens: list[Any] = []
        if self.colbert is not None:
            tokens = pipeline.colbert_corpus()
            self.doc_tokens = [torch.from_numpy(np.array(tokens.pop(i), dtype=np.float32))
                               for i in range(len(self.ids))]
        # the service's reranks mix the reranker's scores with the first stage's at the weights
        # the builder tuned and recorded in the artifact (the reranker alone when there are none)
        artifact = Path(cfg.artifact_dir)
        self.colbert_weight = self.cross_encoder_weight = 1.0
        if (artifact / "manifest.json").is_file():
            manifest = load_manifest(artifact)
            tuned = manifest.indexes.get("colbert", {}).get("interpolation", {})
            self.colbert_weight = float(tuned.get("weights", {}).get("dense", 1.0))
            tuned = manifest.models.get("cross-encoder", {}).get("interpolation", {})
            self.cross_encoder_weight = float(tuned.get("weights", {}).get("dense", 1.0))
        self.version = f"baseline-torch:{Path(cfg.work_dir).name}"
        log.info("baseline loaded %d docs in %.0f ms", len(self.ids), _ms(started))

    def rerank_modes(self) -> list[str]:
        return ["none"] + (["colbert"] if self.colbert is not None else []) + (
            ["cross-encoder"] if self.cross_encoder is not None else [])

    def search(self, query: str, k: int, rerank: str, candidates: int) -> dict[str, Any]:
        """The service's response body for one query (``timings_ms`` filled for the stages run)."""
        import torch

        timings = {"queue": 0.0, "tokenize": 0.0, "encode": 0.0, "ann": 0.0, "sparse": 0.0, "rerank": 0.0,
                   "fetch": 0.0, "total": 0.0}
        started = time.perf_counter()
        with torch.inference_mode():
            t = time.perf_counter()
            q = self.dense.encode_queries([query]).float().numpy()
            timings["encode"] = _ms(t)
            t = time.perf_counter()
            depth = min(max(k, candidates), len(self.ids))
            scores, indices = self.index.search(q, depth)
            timings["ann"] = _ms(t)
            cand = [int(i) for i in indices[0] if i >= 0]
            first = {int(i): float(s) for i, s in zip(indices[0], scores[0]) if i >= 0}
            final = dict(first)
            t = time.perf_counter()
            if rerank == "colbert" and cand:
                assert self.colbert is not None
                qv = self.colbert.encode_queries([query])[0]  # [Lq, dim]
                docs = [self.doc_tokens[i] for i in cand]
                lengths = torch.tensor([len(d) for d in docs])
                padded = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)  # [n, L, dim]
                keep = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
                sims = torch.einsum("qd,ntd->nqt", qv, padded).masked_fill(~keep[:, None, :], -1e4)
                maxsim = sims.max(dim=-1).values.sum(dim=-1).numpy()
                mixed = interpolate(np.array([first[i] for i in cand]), maxsim, self.colbert_weight)
                final = dict(zip(cand, mixed.tolist()))
            elif rerank == "cross-encoder" and cand:
                assert self.cross_encoder is not None
                out: list[float] = []
                for start in range(0, len(cand), 32):
                    part = cand[start : start + 32]
                    out += self.cross_encoder.score_pairs([query] * len(part), [self.texts[i] for i in part]).tolist()
                mixed = interpolate(np.array([first[i] for i in cand]), np.array(out), self.cross_encoder_weight)
                final = dict(zip(cand, mixed.tolist()))
            if rerank != "none":
                timings["rerank"] = _ms(t)
        ranked = sorted(cand, key=lambda i: -final[i])[:k]
        hits = [{"id": self.ids[i], "score": float(final[i]), "rank": r, "first_stage_score": first[i]}
                for r, i in enumerate(ranked, start=1)]
        timings["total"] = _ms(started)
        return {"hits": hits, "timings_ms": {n: round(v, 3) for n, v in timings.items()},
                "artifact_version": self.version, "rerank": rerank, "first_stage": "dense"}


def create_baseline_app(config: Path | None, overrides: Sequence[str] = (), threads: int = 1) -> FastAPI:
    """The baseline FastAPI app; the lifespan loads the :class:`BaselineEngine`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = BaselineEngine(config, overrides, threads)
        yield

    app = FastAPI(title="Baseline retrieval service (PyTorch students, flat FAISS)", lifespan=lifespan)

    @app.post("/search", response_model=SearchResponse, response_model_exclude_none=True)
    def search(body: SearchRequest, request: Request) -> dict[str, Any]:
        engine: BaselineEngine = request.app.state.engine
        if body.first_stage not in (None, "dense"):
            raise HTTPException(422, f"first_stage={body.first_stage!r}: the baseline has only the dense one")
        rerank = body.rerank or "none"
        if rerank not in engine.rerank_modes():
            raise HTTPException(422, f"rerank={rerank!r} is not available")
        if not body.query.strip():
            raise HTTPException(422, "query must be a non-empty string")
        k = body.k or 10
        candidates = body.candidates or 100
        return engine.search(body.query, k, rerank, candidates)

    @app.get("/ready")
    def ready(request: Request) -> dict[str, str]:
        return {"status": "ready", "artifact_version": request.app.state.engine.version}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description="Baseline FastAPI + PyTorch retrieval service.")
    p.add_argument("--config", type=Path, default=Path("configs/scifact.toml"), help="the build config")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=1, help="torch / FAISS intra-op threads (0: library default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_baseline_app(args.config, args.overrides, args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
