"""bf16 autocast training (``train.<kind>.precision``): resolution, validation, stage keys, and
that a bf16-trained student learns, exports to an fp32 graph with parity, and is handed back in fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from index_build.config import load_config  # noqa: E402
from index_build.stages import Pipeline, train_recipe_key  # noqa: E402
from index_build.train import TrainConfig, native_bf16, resolve_precision  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if native_bf16(cpu) else None)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16", cpu)


def test_precision_is_validated_at_load(tiny_beir, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="train.dense.precision must be one of fp32, bf16, auto"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'train.dense.precision="half"'))


def test_precision_in_stage_keys():
    fp32 = train_recipe_key(TrainConfig())
    assert json.loads(fp32)["precision"] == "fp32"  # keyed as resolved
    assert train_recipe_key(TrainConfig(precision="bf16")) != fp32
    auto = train_recipe_key(TrainConfig(precision="auto"))  # keyed as it resolves on this machine
    assert auto == (train_recipe_key(TrainConfig(precision="bf16")) if native_bf16(torch.device("cpu")) else fp32)


@pytest.mark.parametrize("kind", ["dense", "colbert", "cross-encoder"])
def test_bf16_training_tracks_fp32_and_exports_fp32(kind, tiny_beir, tiny_bert, tmp_path):
    """The same recipe in fp32 and bf16 (same batches, same init): the loss curves agree within
    bf16 rounding, and the bf16 student exports to an fp32 graph with parity."""
    logs = {}
    for prec in ("fp32", "bf16"):
        cfg = load_config(overrides=tiny_overrides(
            tiny_beir, tiny_bert, tmp_path / prec, f'students.kinds=["{kind}"]', f"train.{kind}.epochs=12",
            f"train.{kind}.lr=1e-3", f"train.{kind}.warmup=0.0", f'train.{kind}.precision="{prec}"'))
        p = Pipeline(cfg, progress=False)
        p.mine()
        p.distill(kind)
        logs[prec] = json.loads((tmp_path / prec / "work" / f"train-{kind}" / "train_log.json").read_text())
        assert p.export(kind).result["parity_max_abs_diff"] <= 1e-4  # saved weights and graph are fp32
    fp32, bf16 = logs["fp32"]["loss_history"], logs["bf16"]["loss_history"]
    assert len(fp32) == len(bf16)
    # bf16 rounds the transformer's states (~0.4%); a margin of two MaxSim sums feels it more
    assert bf16[0] == pytest.approx(fp32[0], rel=0.1)
    assert np.mean(bf16) == pytest.approx(np.mean(fp32), rel=0.2)
    if kind != "cross-encoder":  # (this toy problem is too small for the cross-encoder to learn much)
        # each window is three whole epochs (every example three times), so how hard one batch happens to be
        # does not decide the comparison
        window = len(bf16) // 4
        assert np.mean(bf16[-window:]) < 0.7 * np.mean(bf16[:window])


def test_autocast_only_inside_training(tiny_bert, tiny_beir, tmp_path):
    from index_build.students import new_student
    from index_build.train import train

    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path))
    p = Pipeline(cfg, progress=False)
    p.mine()
    student = new_student("dense", tiny_bert, max_doc_len=64)
    seen: list = []

    def dev_eval(s) -> float:
        seen.append(s.compute_dtype)
        assert s.encode_queries(["vitamin bone"]).dtype == torch.float32  # heads and scores stay fp32
        return 0.5

    train(student, p.load_mined()["examples"], p.corpus_texts, TrainConfig(epochs=1, precision="bf16"),
          tmp_path / "t", dev_eval=dev_eval, progress=False)
    assert seen and all(d is torch.bfloat16 for d in seen)  # dev selection runs in the trained precision
    assert student.compute_dtype is None                    # callers (export, evaluate) get fp32
    assert all(t.dtype == torch.float32 for t in student.state_dict().values() if t.is_floating_point())
