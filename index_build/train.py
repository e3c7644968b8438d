"""One Margin-MSE training loop for every student kind.

Resumable (a checkpoint every ``checkpoint_every`` steps holds model, optimizer,
scheduler, RNG state and the best dev score), seeded, warmup + linear decay, and model
selection on a held-out dev slice (the best dev checkpoint is the one saved).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index_build.config import PRECISIONS, TrainConfig, resolve_device
from index_build.losses import in_batch_negatives, margin_mse
from index_build.sampling import Example, batches, sample_negatives
from index_build.students import ColbertStudent, CrossEncoderStudent, DenseStudent, Student, set_seed

log = logging.getLogger(__name__)




def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` ``name`` on ``device`` (None: plain fp32).

    >>> resolve_precision("fp32", torch.device("cpu")) is None
    True
    >>> resolve_precision("bf16", torch.device("cpu"))
    torch.bfloat16
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: use one of {', '.join(PRECISIONS)}")
    if name == "fp32":
        return None
    if name == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware (CUDA GPUs from Ampere
    on; CPUs with AVX512-BF16 or AMX, as oneDNN reports them)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


#: TrainConfig fields that do not change what is trained (left out of resume checks)
_PLACEMENT_FIELDS = ("device", "threads")


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig as a dict (``asdict``), without the placement fields."""
    return {k: v for k, v in config.items() if k not in _PLACEMENT_FIELDS}


@dataclass
class TrainResult:
    steps: int
    best_dev: float
    dev_history: list[tuple[int, float]]
    seconds: float
    loss_history: list[float]


def batch_inputs(batch: list[Example], corpus_texts: list[str], negatives: int, rng: random.Random,
                 balanced: bool = False, ict_remove: float = 0.0) -> tuple[list[list[str]], list[list[float]]]:
    """Per query: one positive and ``negatives`` sampled negatives, as document texts and the
    teacher's scores for them (positive first). With probability ``ict_remove`` the query's
    verbatim copy is cut out of the positive (:func:`cut_query`)."""
    docs, t_rows = [], []
    for ex in batch:
        cols = [rng.choice(ex.positives), *sample_negatives(ex, negatives, rng, balanced=balanced)]
        texts = [corpus_texts[int(ex.pool[j])] for j in cols]
        if ict_remove > 0 and rng.random() < ict_remove:
            texts[0] = cut_query(texts[0], ex.query)
        docs.append(texts)
        t_rows.append([float(ex.teacher[j]) for j in cols])
    return docs, t_rows


def cut_query(text: str, query: str) -> str:
    """``text`` without its first verbatim copy of ``query`` (unchanged when there is none,
    or when the query is the whole text).

    >>> cut_query("Title. First sentence here. Second one.", "First sentence here.")
    'Title. Second one.'
    >>> cut_query("abc", "xyz"), cut_query("abc", "abc")
    ('abc', 'abc')
    """
    q = query.strip()
    at = text.find(q) if q else -1
    if at < 0 or len(q) >= len(text.strip()):
        return text
    return " ".join((text[:at].rstrip() + " " + text[at + len(q):].lstrip()).split())


def _margins(scores: np.ndarray) -> np.ndarray:
    """Positive-minus-negative margins of score rows whose first column is the positive."""
    return (scores[:, :1] - scores[:, 1:]).reshape(-1)


def calibrate_teacher_scale(student: Student, examples: list[Example], corpus_texts: list[str],
                            cfg: TrainConfig, student_scale: float) -> float:
    """``std(student margins) / std(teacher margins)`` of the untrained student on
    ``cfg.calibration_batches`` batches (own seed, so training order is unchanged)."""
    rng = random.Random(cfg.seed + 2)
    picks = [examples[rng.randrange(len(examples))] for _ in range(cfg.calibration_batches * cfg.batch_queries)]
    s_m, t_m = [], []
    was_training = student.training
    student.eval()
    with torch.inference_mode():
        for i in range(0, len(picks), cfg.batch_queries):
            batch = picks[i : i + cfg.batch_queries]
            docs, t_rows = batch_inputs(batch, corpus_texts, cfg.negatives, rng)
            s, _ = student_scores(student, [ex.query for ex in batch], docs)
            s_m.append(_margins(s.float().cpu().numpy() * student_scale))
            t_m.append(_margins(np.asarray(t_rows, dtype=np.float64)))
    student.train(was_training and cfg.dropout)
    s_std, t_std = float(np.concatenate(s_m).std()), float(np.concatenate(t_m).std())
    if not (t_std > 0 and s_std > 0):
        return 1.0
    return s_std / t_std


def student_scores(student: Student, queries: list[str], docs: list[list[str]]
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Scores ``[B, n_docs]`` of each query against its own documents (first one is the positive),
    plus ``(query_emb, doc_emb)`` for dense students (for in-batch negatives)."""
    b, n = len(queries), len(docs[0])
    flat = [d for ds in docs for d in ds]
    if isinstance(student, DenseStudent):
        q = student.encode_queries(queries)
        d = student.encode_docs(flat)
        return torch.einsum("bd,bnd->bn", q, d.view(b, n, -1)), (q, d)
    if isinstance(student, ColbertStudent):
        q = student.encode_queries(queries)
        d, keep = student.encode_docs(flat)
        qq = q.repeat_interleave(n, dim=0)
        return ColbertStudent.maxsim(qq, d, keep).view(b, n), None
    if isinstance(student, CrossEncoderStudent):
        qs = [q for q in queries for _ in range(n)]
        return student.score_pairs(qs, flat).view(b, n), None
    raise TypeError(f"unsupported student {type(student).__name__}")


def pool_scores(student: Student, queries: list[str], pools: list[np.ndarray], corpus_texts: list[str],
                batch_size: int = 32, progress: bool = False) -> list[np.ndarray]:
    """Scores of each query against the corpus documents of its own pool (ids into
    ``corpus_texts``), as :func:`student_scores` gives them. A bi-encoder (dense, ColBERT)
    encodes each distinct document once, in length-sorted batches, however many pools hold it;
    a cross-encoder scores every pair."""
    from tqdm import tqdm

    from models.encoders import length_sorted_batches

    pools = [np.asarray(p, dtype=np.int64) for p in pools]
    if not isinstance(student, (DenseStudent, ColbertStudent)):
        out = []
        for q, pool in tqdm(list(zip(queries, pools)), desc="dev eval", unit="query", disable=not progress,
                            leave=False):
            parts = [student_scores(student, [q], [[corpus_texts[int(d)] for d in pool[i : i + batch_size]]])[0][0]
                     for i in range(0, len(pool), batch_size)]
            out.append(torch.cat(parts).float().cpu().numpy() if parts else np.zeros(0, np.float32))
        return out
    uniq = np.unique(np.concatenate([np.zeros(0, np.int64), *pools]))
    texts = [corpus_texts[int(d)] for d in uniq]
    q = student.encode_queries(list(queries))
    docs: list[torch.Tensor] = [torch.zeros(0)] * len(texts)
    batches_ = list(length_sorted_batches(student.tokenizer.token_lengths(texts), batch_size))
    for idx in tqdm(batches_, desc="dev eval (distinct pool docs)", unit="batch", disable=not progress, leave=False):
        chunk = [texts[i] for i in idx]
        if isinstance(student, DenseStudent):
            for i, v in zip(idx, student.encode_docs(chunk)):
                docs[i] = v
        else:
            d, keep = student.encode_docs(chunk)
            for j, i in enumerate(idx):
                docs[i] = d[j][keep[j]]
    rows = [np.searchsorted(uniq, pool) for pool in pools]
    if isinstance(student, DenseStudent):
        emb = torch.stack(docs) if docs else torch.zeros(0, q.shape[-1])
        return [(emb[torch.from_numpy(r)] @ q[n]).float().cpu().numpy() for n, r in enumerate(rows)]
    out = []
    for n, r in enumerate(rows):  # MaxSim; a document without kept tokens scores -1e4 per query token
        s = [(q[n] @ docs[i].T).max(dim=1).values.sum() if len(docs[i]) else q.new_tensor(-1e4 * q.shape[1])
             for i in r]
        out.append(torch.stack(s).float().cpu().numpy() if s else np.zeros(0, np.float32))
    return out


def train(student: Student, examples: list[Example], corpus_texts: list[str], cfg: TrainConfig, work_dir: Path,
          dev_eval: Callable[[Student], float] | None = None, clusters: np.ndarray | None = None,
          progress: bool = True, stop_after: int | None = None,
          initial_dev: Callable[[], float | None] | None = None) -> TrainResult:
    """Distill ``student`` on ``examples``; the best-on-dev model is saved to ``work_dir/best``.

    A checkpoint in ``work_dir`` written for the same config is resumed. ``stop_after``
    ends this call after that many steps (as a preemption would); call again to go on.
    ``initial_dev``: the untrained student's dev score when the caller can tell it more
    cheaply than ``dev_eval`` (e.g. from cached encodings of the same base model); None from
    it means "evaluate as usual".
    """
    from tqdm import tqdm

    if not examples:
        raise ValueError("no training examples (no query has both a positive and a negative)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    student.to(device)
    student.compute_dtype = resolve_precision(cfg.precision, device)
    work_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    run = _TrainRun(student, cfg, work_dir, len(examples))
    run.resume()
    scale = cfg.score_scale if cfg.score_scale is not None else (20.0 if isinstance(student, DenseStudent) else 1.0)
    state = run.state
    # Deterministic order of batches: regenerate the schedule from the seed, skip done steps.
    order_rng = random.Random(cfg.seed + 1)
    schedule: list[list[int]] = []
    while len(schedule) < run.total_steps:
        schedule.extend(batches(examples, cfg.batch_queries, order_rng, clusters))
    schedule = schedule[: run.total_steps]

    if state["step"] == 0 and dev_eval is not None and not state["dev_history"]:
        # the initial model competes too: distillation must not make it worse
        run.evaluate_and_keep(dev_eval, initial_dev() if initial_dev is not None else None)
    if "teacher_scale" not in state:
        state["teacher_scale"] = (calibrate_teacher_scale(student, examples, corpus_texts, cfg, scale)
                                  if cfg.teacher_scale == "auto" else float(cfg.teacher_scale))
        log.info("teacher scale %.4f", state["teacher_scale"])
    t_scale = float(state["teacher_scale"])
    student.train(cfg.dropout)
    t0 = time.perf_counter() - state["seconds"]
    bar = tqdm(total=run.total_steps, initial=state["step"], desc=f"distill {student.kind}", unit="step",
               disable=not progress)
    stop_at = run.total_steps if stop_after is None else min(run.total_steps, state["step"] + stop_after)
    while state["step"] < stop_at:
        loss = step_loss(student, [examples[i] for i in schedule[state["step"]]], corpus_texts, cfg, run.rng,
                         scale, t_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["loss_history"].append(float(loss.detach()))
        state["seconds"] = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(state['loss_history'][-20:]):.3f}")
        if state["step"] % run.eval_every == 0 or state["step"] == run.total_steps:
            run.evaluate_and_keep(dev_eval)
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] in (run.total_steps, stop_at):
            run.save_checkpoint()
    bar.close()
    student.to("cpu")  # callers go on to export / evaluate on the CPU, in fp32
    student.compute_dtype = None
    if state["step"] >= run.total_steps:
        if dev_eval is None:
            student.save(work_dir / "best")
        (work_dir / "train_log.json").write_text(json.dumps(state, indent=1))
    return TrainResult(state["step"], state["best_dev"], state["dev_history"], state["seconds"], state["loss_history"])


def step_loss(student: Student, batch: list[Example], corpus_texts: list[str], cfg: TrainConfig,
              rng: random.Random, scale: float, t_scale: float) -> torch.Tensor:
    """Margin-MSE of one batch: each query's positive against its sampled negatives, the
    student's score margins (times ``scale``) against the teacher's (times ``t_scale``), plus
    ``cfg.in_batch_weight`` times the in-batch-negatives loss for a dense student."""
    docs, t_rows = batch_inputs(batch, corpus_texts, cfg.negatives, rng, balanced=cfg.tas_balanced,
                                ict_remove=cfg.ict_remove)
    s, emb = student_scores(student, [ex.query for ex in batch], docs)
    s = s * scale
    t = torch.tensor(t_rows, dtype=s.dtype, device=s.device) * t_scale
    n = s.shape[1] - 1
    loss = margin_mse(s[:, :1].expand(-1, n), s[:, 1:], t[:, :1].expand(-1, n), t[:, 1:])
    if cfg.in_batch_weight and emb is not None:
        # every scored document of the batch is a candidate for every query; query i's positive is row i*(n+1)
        q_emb, d_emb = emb
        loss = loss + cfg.in_batch_weight * in_batch_negatives(
            q_emb, d_emb, torch.arange(len(batch), device=s.device) * (n + 1), scale=scale)
    return loss


class _TrainRun:
    """The optimizer, schedule, sampling state and progress of one training run, and its
    checkpoint (``work_dir/checkpoint.pt``) and best-on-dev model (``work_dir/best``)."""

    def __init__(self, student: Student, cfg: TrainConfig, work_dir: Path, n_examples: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        self.student, self.cfg, self.work_dir, self.n_examples = student, cfg, work_dir, n_examples
        self.rng = random.Random(cfg.seed)
        head_params = [p for n, p in student.named_parameters() if not n.startswith("encoder.")]
        body_params = [p for n, p in student.named_parameters() if n.startswith("encoder.")]
        self.optimizer = torch.optim.AdamW([{"params": body_params, "lr": cfg.lr},
                                            {"params": head_params, "lr": cfg.head_lr}],
                                           weight_decay=cfg.weight_decay)
        steps_per_epoch = -(-n_examples // cfg.batch_queries)
        self.total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(cfg.warmup * self.total_steps),
                                                         self.total_steps)
        self.eval_every = cfg.eval_every or steps_per_epoch
        self.ckpt_path = work_dir / "checkpoint.pt"
        self.state: dict[str, Any] = {"step": 0, "best_dev": -1.0, "dev_history": [], "loss_history": [],
                                      "seconds": 0.0}

    def resume(self) -> None:
        """Continue from the checkpoint when it was written for this recipe and these examples."""
        if not self.ckpt_path.is_file():
            return
        saved = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        if _recipe(saved.get("config", {})) != _recipe(asdict(self.cfg)) or saved.get("n_examples") != self.n_examples:
            log.warning("ignoring checkpoint %s: written for another config", self.ckpt_path)
            return
        self.student.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        self.state = saved["state"]
        log.info("resumed %s at step %d", self.work_dir, self.state["step"])

    def save_checkpoint(self) -> None:
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save({"config": asdict(self.cfg), "n_examples": self.n_examples, "model": self.student.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(), "state": self.state}, tmp)
        tmp.replace(self.ckpt_path)

    def evaluate_and_keep(self, dev_eval: Callable[[Student], float] | None, known: float | None = None) -> None:
        """Record the dev score (``known``, or measured now) and save the model when it is the best yet."""
        if dev_eval is None:
            return
        if known is None:
            self.student.eval()
            with torch.inference_mode():
                known = dev_eval(self.student)
            self.student.train(self.cfg.dropout)
        score = float(known)
        self.state["dev_history"].append((self.state["step"], score))
        log.info("step %d dev %.4f (best %.4f)", self.state["step"], score, self.state["best_dev"])
        if score > self.state["best_dev"]:
            self.state["best_dev"] = score
            self.student.save(self.work_dir / "best")

