from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from index_build.export import INT8_NAME, export_student  # noqa: E402
from index_build.students import load_student, new_student  # noqa: E402
from models.encoders import ColbertEncoder, CrossEncoderScorer, DenseEncoder  # noqa: E402

TEXTS = ["vitamin deficiency and bone fracture in the elderly.", "gene mutation, dna expression!",
         "heart", "the brain cortex stores memory; neurons fire"]


@pytest.mark.parametrize("kind", ["dense", "colbert", "cross-encoder"])
def test_onnx_parity_and_int8(kind, tiny_bert, tmp_path):
    student = new_student(kind, tiny_bert, max_doc_len=48)
    student.save(tmp_path / "student")
    report = export_student(tmp_path / "student", tmp_path / "onnx", int8=True, parity_texts=TEXTS)
    assert report.max_abs_diff <= 1e-4
    assert (tmp_path / "onnx" / INT8_NAME).is_file()
    assert report.int8_max_abs_diff is not None and np.isfinite(report.int8_max_abs_diff)
    # a freshly loaded torch student equals the saved one (symmetric save/load)
    reloaded = load_student(tmp_path / "student")
    for (n1, p1), (n2, p2) in zip(student.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and np.allclose(p1.numpy(), p2.numpy())


def test_runtime_shapes(tiny_bert, tmp_path):
    for kind in ["dense", "colbert", "cross-encoder"]:
        new_student(kind, tiny_bert, max_doc_len=48, colbert_query_len=16).save(tmp_path / kind)
        export_student(tmp_path / kind, tmp_path / f"{kind}-onnx", int8=False, parity_texts=TEXTS)
    dense = DenseEncoder(tmp_path / "dense-onnx")
    e = dense.encode_docs(TEXTS, batch_size=3)
    assert e.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    # length-sorted batching must not change results
    np.testing.assert_allclose(e, dense.encode_docs(TEXTS, batch_size=1), atol=1e-5)
    cb = ColbertEncoder(tmp_path / "colbert-onnx")
    q = cb.encode_queries(["vitamin bone", "gene"])
    assert q.shape == (2, 16, 128)
    docs = cb.encode_docs(TEXTS)
    assert all(d.shape[1] == 128 for d in docs)
    assert docs[1].shape[0] < len(cb.tokenizer.encode_colbert_docs([TEXTS[1]], 48).input_ids[0])  # skiplist
    ce = CrossEncoderScorer(tmp_path / "cross-encoder-onnx")
    s = ce.score("vitamin", TEXTS)
    assert s.shape == (4,)
    with pytest.raises(ValueError, match="expected a dense model"):
        DenseEncoder(tmp_path / "colbert-onnx")


def test_per_channel_int8_has_a_scale_per_output_column(tiny_bert, tmp_path):
    import onnx
    from onnx import numpy_helper

    from index_build.export import ONNX_NAME, quantize_int8

    new_student("dense", tiny_bert, max_doc_len=48).save(tmp_path / "student")
    export_student(tmp_path / "student", tmp_path / "onnx", int8=False, parity_texts=TEXTS)

    def scale_sizes(per_channel: bool) -> set[int]:
        out = tmp_path / f"q-{per_channel}.onnx"
        quantize_int8(tmp_path / "onnx" / ONNX_NAME, out, per_channel=per_channel)
        inits = onnx.load(str(out)).graph.initializer
        return {numpy_helper.to_array(t).size for t in inits if t.name.endswith("_scale")}

    assert scale_sizes(False) == {1}
    assert max(scale_sizes(True)) > 1      # e.g. one per hidden unit of each projection
