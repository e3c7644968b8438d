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


def test_int8_export_keeps_onnxruntime_root_info_out_of_the_log(tiny_bert, tmp_path, caplog):
    import logging

    from index_build.export import ONNX_NAME, PREPROCESS_HINT, quantize_int8

    new_student("dense", tiny_bert, max_doc_len=48).save(tmp_path / "student")
    export_student(tmp_path / "student", tmp_path / "onnx", int8=False, parity_texts=TEXTS)
    caplog.set_level(logging.INFO)
    quantize_int8(tmp_path / "onnx" / ONNX_NAME, tmp_path / "q.onnx", per_channel=True)
    assert not [r for r in caplog.records if r.name == "root" and r.levelno < logging.WARNING]
    assert not [r for r in caplog.records if PREPROCESS_HINT in r.getMessage()]
    logging.getLogger().info("after the export")              # the filter is gone afterwards
    logging.getLogger("index_build.test").info("named logger")
    assert [r.getMessage() for r in caplog.records][-2:] == ["after the export", "named logger"]


def _two_matmul_graph(path):
    """Two independent MatMuls with constant weights: ``first`` reads input a, ``second`` input b."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = (rng.normal(size=(64, 64)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w1"], ["y1"], name="first"),
         helper.make_node("MatMul", ["b", "w2"], ["y2"], name="second")],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 64]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 64]) for n in ("y1", "y2")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_int8_weights_fit_in_seven_bits_so_avx2_integer_gemm_cannot_saturate(tmp_path):
    """Positive activations (u8 up to 255) against weights of one sign: with 8-bit weights
    a pair of products (255 * 127 * 2) overflows the int16 sums of ONNX Runtime's u8 x s8
    kernel on CPUs without VNNI, and the result collapses; 7-bit weights stay exact enough
    on every host. The weight-range check holds on any CPU."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from index_build.export import quantize_int8
    from models.encoders import make_session

    rng = np.random.default_rng(2)
    w = rng.uniform(0.5, 1.0, size=(64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    for per_channel in (False, True):
        out = tmp_path / f"q-{per_channel}.onnx"
        quantize_int8(tmp_path / "g.onnx", out, per_channel=per_channel)
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                   if t.data_type == TensorProto.INT8 and t.dims]
        assert weights and all(-64 <= q.min() and q.max() <= 64 for q in weights)
        a = rng.uniform(0.9, 1.0, size=(16, 64)).astype(np.float32)
        got = make_session(out).run(None, {"a": a})[0]
        np.testing.assert_allclose(got, a @ w, rtol=0.02)


def test_int8_keeps_matmuls_with_outlier_inputs_in_fp32(tmp_path):
    import onnx

    from index_build.export import outlier_matmuls, quantize_int8

    rng = np.random.default_rng(1)
    a, b = (rng.normal(size=(1024, 64)).astype(np.float32) for _ in range(2))
    b[7, 3] = 1e4                                   # one outlier feature value: peak/RMS about 250
    _two_matmul_graph(tmp_path / "g.onnx")
    assert outlier_matmuls(tmp_path / "g.onnx", {"a": a, "b": a}) == []
    assert outlier_matmuls(tmp_path / "g.onnx", {"a": a, "b": b}) == ["second"]
    assert outlier_matmuls(tmp_path / "g.onnx", {"a": a, "b": b}, ratio=1e3) == []
    kept = quantize_int8(tmp_path / "g.onnx", tmp_path / "q.onnx", per_channel=True, calibration={"a": a, "b": b})
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert kept == ["second"] and ops["second"] == "MatMul"            # fp32 weights
    assert "first" not in ops and any(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops.values())
    assert quantize_int8(tmp_path / "g.onnx", tmp_path / "q2.onnx") == []   # no calibration: all int8


def test_dense_queries_encode_alike_in_length_sorted_batches(tiny_bert, tmp_path):
    from models.encoders import QUERY_BATCH

    new_student("dense", tiny_bert, max_doc_len=48).save(tmp_path / "student")
    export_student(tmp_path / "student", tmp_path / "onnx", int8=False, parity_texts=TEXTS)
    enc = DenseEncoder(tmp_path / "onnx")
    words = "gene dna vitamin bone heart brain cortex memory neuron".split()
    queries = [" ".join(words[: 1 + i % len(words)]) + f" {i}" for i in range(QUERY_BATCH + 7)]
    batched = enc.encode_queries(queries)
    one_by_one = np.concatenate([enc.encode_queries([q]) for q in queries])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)      # rows stay in input order


def test_smoothquant_keeps_the_function_and_helps_int8(tmp_path):
    import onnxruntime as ort

    from index_build.export import quantize_int8, smooth_matmuls

    rng = np.random.default_rng(1)
    a, b = (rng.normal(size=(1024, 64)).astype(np.float32) for _ in range(2))
    b[7, 3] = 1e4
    feed = {"a": a, "b": b}
    _two_matmul_graph(tmp_path / "g.onnx")

    def run(name):
        return ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, feed)[1]

    ref = run("g.onnx")
    assert smooth_matmuls(tmp_path / "g.onnx", tmp_path / "s.onnx", {"second": np.abs(b).max(0)}) == ["second"]
    np.testing.assert_allclose(run("s.onnx"), ref, rtol=1e-4, atol=1e-2)     # same function, rescaled
    assert quantize_int8(tmp_path / "g.onnx", tmp_path / "q.onnx", per_channel=True) == []
    kept = quantize_int8(tmp_path / "g.onnx", tmp_path / "qs.onnx", per_channel=True, calibration=feed,
                         outliers="smooth")
    assert kept == []                                                          # smoothed, then all int8
    rows = np.arange(len(b)) != 7
    err_plain = np.abs(run("q.onnx") - ref)[rows].mean()
    err_smooth = np.abs(run("qs.onnx") - ref)[rows].mean()
    assert err_smooth < 0.5 * err_plain


def test_per_token_int8_stays_close_to_fp32_on_every_row(tmp_path):
    """One activation scale per row: a small row next to a large one keeps its precision (with
    one scale per tensor it is rounded away), also after ONNX Runtime's fusions."""
    import onnxruntime as ort

    from index_build.export import per_token_activations, quantize_int8

    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 64)).astype(np.float32)
    a[0] *= 1e3                                           # a loud batch-mate
    feed = {"a": a, "b": a}
    _two_matmul_graph(tmp_path / "g.onnx")

    def run(name):
        return ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, feed)[0]

    ref = run("g.onnx")
    quantize_int8(tmp_path / "g.onnx", tmp_path / "tensor.onnx", per_channel=True)
    quantize_int8(tmp_path / "g.onnx", tmp_path / "token.onnx", per_channel=True, activations="token")

    def rel_err(name):
        got = run(name)
        return np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)

    assert rel_err("token.onnx").max() < 0.03
    assert rel_err("tensor.onnx")[1:].min() > 0.1               # the quiet rows lose their precision
    assert per_token_activations(tmp_path / "g.onnx", tmp_path / "same.onnx") == 0   # nothing quantized
    with pytest.raises(ValueError, match="int8 activations must be one of tensor, token"):
        quantize_int8(tmp_path / "g.onnx", tmp_path / "bad.onnx", activations="row")


@pytest.mark.parametrize("activations", ["tensor", "token"])
def test_int8_query_embedding_and_its_batch_mates(tiny_bert, tmp_path, activations):
    """With per-token scales a query's int8 embedding is the same alone and batched with a
    longer, louder query (padding included); with ONNX Runtime's per-tensor scale it is not."""
    new_student("dense", tiny_bert, max_doc_len=48).save(tmp_path / "student")
    export_student(tmp_path / "student", tmp_path / "onnx", int8=True, parity_texts=TEXTS,
                   int8_activations=activations)
    fp32, int8 = DenseEncoder(tmp_path / "onnx"), DenseEncoder(tmp_path / "onnx", onnx_file=INT8_NAME)
    query, mate = "vitamin bone", " ".join(TEXTS * 3)
    alone = int8.encode_queries([query])[0]
    batched = int8.encode_queries([query, mate])[0]
    if activations == "token":
        np.testing.assert_allclose(alone, batched, atol=1e-6)
    else:
        assert np.abs(alone - batched).max() > 1e-5       # per-token: within 1e-6
    assert float(alone @ fp32.encode_queries([query])[0]) > 0.95


def test_lengths_beyond_the_checkpoints_positions_are_capped(tiny_bert, tmp_path, caplog):
    """A student asked for more tokens than its checkpoint has positions (tiny BERT: 128) takes
    as many as it has, so long documents encode instead of failing inside ONNX Runtime."""
    student = new_student("dense", tiny_bert, max_doc_len=256, max_query_len=200)
    assert (student.config.max_doc_len, student.config.max_query_len) == (128, 128)
    assert "exceeds the checkpoint's 128 positions" in caplog.text
    student.save(tmp_path / "student")
    export_student(tmp_path / "student", tmp_path / "onnx", int8=False, parity_texts=TEXTS)
    long_doc = " ".join(TEXTS * 40)
    enc = DenseEncoder(tmp_path / "onnx")
    assert enc.encode_docs([long_doc]).shape == (1, 32) and enc.encode_queries([long_doc]).shape == (1, 32)
