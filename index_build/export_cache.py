"""ONNX exports of base checkpoints (teacher bi-encoders, the ``base-dense`` system),
made once per checkpoint fingerprint into the cache dir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from index_build.export import INT8_WEIGHT_BITS, OUTLIER_RATIO
from models.sources import cache_dir, fingerprint, resolve_model


def base_dense_onnx(model_ref: str, *, max_doc_len: int = 256) -> tuple[Path, str]:
    """``(dir, fingerprint)`` of a dense ONNX export of ``model_ref`` without training; its
    int8 graph (an int8 teacher member's) is quantized per channel, outlier MatMuls kept fp32."""
    path = resolve_model(model_ref)
    fp = fingerprint(path)
    # "-pc-o<ratio>-w<bits>": int8 per channel, MatMuls with outlier inputs kept fp32
    # (export.OUTLIER_RATIO), weights in export.INT8_WEIGHT_BITS bits
    out = cache_dir() / "onnx" / f"dense-{fp}-{max_doc_len}-pc-o{OUTLIER_RATIO:g}-w{INT8_WEIGHT_BITS}"
    if (out / "model.onnx").is_file():
        return out, fp
    from index_build.export import export_student
    from index_build.students import new_student

    staging = out.with_name(out.name + f".staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        new_student("dense", path, max_doc_len=max_doc_len).save(staging / "student")
        export_student(staging / "student", staging / "onnx", int8=True, per_channel=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging / "onnx", out)
        except OSError:
            if not (out / "model.onnx").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, fp
