"""GPU exploration (not a benchmark): labelled SciFact dense distillation recipes, selected on
the dev slice; test nDCG@10 recorded for information. Writes $OUT/sweep.json after each run."""
import gzip
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from safetensors.torch import load_file, save_file  # noqa: E402

from index_build.data import load_collection  # noqa: E402
from index_build.metrics import metrics  # noqa: E402
from index_build.students import interpolate_with_base, load_student, new_student  # noqa: E402
from index_build.train import TrainConfig, train  # noqa: E402

G = Path(".gpu")
OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)
base = Path("/tmp/minilm")
if not base.exists():
    import shutil
    shutil.copytree(G / "minilm", base)
    sd = load_file(base / "model.fp16.safetensors")
    save_file({k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    (base / "model.fp16.safetensors").unlink()
data = Path("/tmp/scifact")
if not data.exists():
    import shutil
    shutil.copytree(G / "data", data)
    (data / "corpus.jsonl").write_bytes(gzip.decompress((data / "corpus.jsonl.gz").read_bytes()))
    (data / "corpus.jsonl.gz").unlink()
col = load_collection(data)
texts = col.doc_texts()
SMOKE = bool(os.environ.get("SMOKE"))
DEV = "cpu" if SMOKE else "cuda"
N_EVAL = 300 if SMOKE else len(texts)
doc_ids = col.doc_ids
test_q = col.split_queries("test")
train_qrels = col.qrels["train"]


@torch.inference_mode()
def retrieval_ndcg(student, qids, queries, qrels) -> float:
    student.eval()
    lengths = student.tokenizer.token_lengths(texts[:N_EVAL])
    order = np.argsort(lengths)
    emb = torch.zeros((N_EVAL, student.config.dim), device=student.device)
    for s in range(0, len(order), 256):
        idx = order[s:s + 256]
        emb[torch.from_numpy(idx).to(student.device)] = student.encode_docs([texts[i] for i in idx])
    q = student.encode_queries(queries)
    sc, ix = torch.topk(q @ emb.T, 100, dim=1)
    run = {qid: {doc_ids[int(j)]: float(x) for j, x in zip(i_, s_)}
           for qid, i_, s_ in zip(qids, ix.cpu().numpy(), sc.cpu().numpy())}
    return metrics(qrels, run)["nDCG@10"]


def load_examples(name):
    with open(G / name / "mine.pkl", "rb") as f:
        mined = pickle.load(f)
    with open(G / name / "pseudo.pkl", "rb") as f:
        pseudo = pickle.load(f)
    return mined, list(mined["examples"]) + list(pseudo)


RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("m2-default", "m2", {}),
    ("m3-scale0.6667", "m3", {"teacher_scale": 0.6667}),
    ("m3-scale0.6667-lr5e-5", "m3", {"teacher_scale": 0.6667, "lr": 5e-5}),
    ("m3-scale0.6667-ep3", "m3", {"teacher_scale": 0.6667, "epochs": 3.0, "eval_every": 432}),
    ("m2-ep3", "m2", {"epochs": 3.0, "eval_every": 432}),
    ("m3-scale0.6667-ib0.1", "m3", {"teacher_scale": 0.6667, "in_batch_weight": 0.1}),
    ("m3-scale0.6667-bq16-lr8e-5", "m3", {"teacher_scale": 0.6667, "batch_queries": 16, "lr": 8e-5,
                                          "eval_every": 36}),
]
only = sys.argv[1:]
results = {}
base_student = new_student("dense", base, max_query_len=64, max_doc_len=256).to(DEV)
dev_mined, _ = load_examples("m2")
dev = dev_mined["dev"]
dev_qrels = {q: train_qrels[q] for q in dev["qids"]}
results["base"] = {"dev": round(retrieval_ndcg(base_student, dev["qids"], dev["queries"], dev_qrels), 4),
                   "test": round(retrieval_ndcg(base_student, list(test_q), list(test_q.values()),
                                                col.qrels["test"]), 4)}
print("base", results["base"], flush=True)
del base_student
for name, mined_name, over in RUNS:
    if only and name not in only:
        continue
    t0 = time.time()
    mined, examples = load_examples(mined_name)
    if SMOKE:
        examples = examples[:16]
    dev = mined["dev"]
    dev_qrels = {q: train_qrels[q] for q in dev["qids"]}
    cfg = TrainConfig(**{"epochs": 1.0, "dev_retrieval": True, "eval_every": 144, "device": DEV, **over})
    student = new_student("dense", base, max_query_len=64, max_doc_len=256)
    work = Path(f"/tmp/sweep/{name}")
    res = train(student, examples, texts, cfg, work, progress=False,
                dev_eval=lambda s, dev=dev, dq=dev_qrels: retrieval_ndcg(  # type: ignore[misc]
                    s, dev["qids"], dev["queries"], dq))
    row: dict[str, Any] = {"config": over, "teacher": mined_name, "examples": len(examples), "steps": res.steps,
                           "dev_history": res.dev_history, "train_s": round(res.seconds, 1), "wise_ft": {}}
    for alpha in (0.3, 0.5, 0.7, 1.0):
        s = load_student(work / "best")
        if alpha != 1.0:
            s = interpolate_with_base(s, base, alpha)
        s = s.to(DEV)
        row["wise_ft"][str(alpha)] = {
            "dev": round(retrieval_ndcg(s, dev["qids"], dev["queries"], dev_qrels), 4),
            "test": round(retrieval_ndcg(s, list(test_q), list(test_q.values()), col.qrels["test"]), 4)}
    row["seconds"] = round(time.time() - t0, 1)
    results[name] = row
    print(name, json.dumps(row), flush=True)
    (OUT / "sweep.json").write_text(json.dumps(results, indent=1))
