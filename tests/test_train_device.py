"""Where distillation runs: device resolution everywhere, and (on a machine whose torch sees a
CUDA GPU) training on the GPU against the same training on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from index_build.config import load_config
from index_build.sampling import Example
from index_build.students import load_student, new_student
from index_build.train import TrainConfig, resolve_device, student_scores, train

CUDA = torch.cuda.is_available()


def test_device_resolution_and_config_errors(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="use 'auto', 'cpu', 'cuda'"):
        resolve_device("tpu")
    if not CUDA:
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match=r"train\.colbert\.device"):
        load_config(overrides=['train.colbert.device="gpu0"'])


def test_device_is_not_part_of_the_stage_key():
    from index_build.stages import train_recipe_key

    keys = {train_recipe_key(load_config(overrides=[f'train.dense.device="{d}"']).train["dense"])
            for d in ("auto", "cpu")}
    assert len(keys) == 1
    assert train_recipe_key(TrainConfig(lr=1e-5)) != train_recipe_key(TrainConfig())


def _examples(corpus_texts: list[str], n_queries: int = 8, pool: int = 10) -> list[Example]:
    rng = np.random.default_rng(0)
    out = []
    for q in range(n_queries):
        idx = rng.choice(len(corpus_texts), size=pool, replace=False)
        teacher = rng.normal(size=pool).astype(np.float32)
        teacher[0] = teacher.max() + 1.0
        out.append(Example(f"q{q}", corpus_texts[int(idx[0])].split(".")[0], idx.astype(np.int64), teacher,
                           positives=[0], negatives=list(range(1, pool))))
    return out


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU visible to torch")
@pytest.mark.parametrize("kind", ["dense", "colbert", "cross-encoder"])
def test_training_on_cuda_matches_cpu(kind, tiny_beir, tiny_bert, tmp_path):
    corpus = [json.loads(line) for line in (tiny_beir / "corpus.jsonl").read_text().splitlines()]
    texts = [f"{d['title']}. {d['text']}" for d in corpus]
    examples = _examples(texts)
    runs = {}
    for device in ("cpu", "cuda"):
        student = new_student(kind, tiny_bert, max_doc_len=64)
        seen: list[str] = []

        def dev_eval(s, seen=seen) -> float:
            seen.append(s.device.type)
            return float(len(seen))  # each evaluation beats the last: "best" is the final model

        cfg = TrainConfig(epochs=2.0, batch_queries=2, negatives=3, device=device, eval_every=4)
        res = train(student, examples, texts, cfg, tmp_path / device, dev_eval=dev_eval, progress=False)
        assert set(seen) == {device}, "the model trained where the config said"
        assert student.device.type == "cpu", "handed back on the CPU"
        runs[device] = (res, student)
    cpu, gpu = runs["cpu"][0], runs["cuda"][0]
    assert gpu.steps == cpu.steps == 8
    np.testing.assert_allclose(gpu.loss_history, cpu.loss_history, rtol=2e-2, atol=1e-3)
    # the best checkpoint written from the GPU loads on the CPU and scores like the trained model
    loaded = load_student(tmp_path / "cuda" / "best")
    with torch.inference_mode():
        a, _ = student_scores(loaded, ["a query"], [texts[:4]])
        b, _ = student_scores(runs["cuda"][1].eval(), ["a query"], [texts[:4]])
    assert a.device.type == "cpu"
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
