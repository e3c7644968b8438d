"""Asymmetric distillation on the tiny corpus: the teacher's space, the losses, the query-only
student (training, save/load, ONNX export served as a dense model)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from index_build.asymmetric import (  # noqa: E402
    TeacherSpace,
    encode_queries,
    init_maps_by_ridge,
    member_scores,
    teacher_pools,
    train_asymmetric,
)
from index_build.cache import ArrayCache  # noqa: E402
from index_build.config import AsymmetricConfig  # noqa: E402
from index_build.data import load_collection  # noqa: E402
from index_build.losses import alignment_mse, listwise_kl  # noqa: E402
from index_build.students import AsymmetricStudent, load_student, new_asymmetric_student  # noqa: E402
from index_build.teachers import BiEncoderTeacher  # noqa: E402
from models.sparse_index import BM25Index  # noqa: E402


@pytest.fixture(scope="module")
def space(tiny_beir, tiny_bert, tmp_path_factory):
    col = load_collection(tiny_beir)
    cache = ArrayCache(tmp_path_factory.mktemp("asym") / "arrays.sqlite")
    members = [BiEncoderTeacher(str(tiny_bert), col.doc_texts(), cache, progress=False),
               BiEncoderTeacher(str(tiny_bert), col.doc_texts(), cache, int8=True, progress=False, name="int8")]
    return col, TeacherSpace(members)


def test_teacher_query_vectors_reproduce_each_members_cosines(space):
    col, sp = space
    queries = list(col.queries.values())[:8]
    docs, q = sp.doc_vectors(), sp.query_vectors(queries)
    assert docs.shape == (len(col.docs), sum(sp.dims)) and q.shape == (8, sum(sp.dims))
    per_member = [m.encode_queries(queries) @ m.doc_embeddings.T for m in sp.members]
    np.testing.assert_allclose(q @ docs.T, sum(per_member), atol=1e-4)
    start = 0
    for dim, cos in zip(sp.dims, per_member):  # each part alone is that member's cosine
        np.testing.assert_allclose(q[:, start : start + dim] @ docs[:, start : start + dim].T, cos, atol=1e-4)
        start += dim


def test_member_scores_are_the_teachers_scores_without_bm25(space):
    col, sp = space
    queries = list(col.queries.values())[:4]
    parts, docs = sp.query_parts(queries), sp.doc_parts()
    bm25 = BM25Index.build(col.doc_texts())
    pools, full = teacher_pools(parts, docs, bm25, queries, 10)

    def z(x):
        return (x - x.mean()) / x.std()

    for r, (text, pool) in enumerate(zip(queries, pools)):  # the full teacher less its BM25 term
        np.testing.assert_allclose(member_scores(parts, docs, pools, [1.0, 1.0])[r],
                                   full[r] - z(bm25.scores(text)[pool]), atol=1e-4)
    weighted = member_scores(parts, docs, pools, [2.0, 0.5])
    for r, pool in enumerate(pools):
        by_hand = 2.0 * z(docs[0][pool] @ parts[0][r]) + 0.5 * z(docs[1][pool] @ parts[1][r])
        np.testing.assert_allclose(weighted[r], by_hand, atol=1e-4)
    with pytest.raises(ValueError, match="weights"):
        member_scores(parts, docs, pools, [1.0])


def test_alignment_and_listwise_losses_match_hand_computations():
    s = torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    by_hand = (((0.6 - 1) ** 2 + 0.8**2) + (1 + 1)) / 2
    assert alignment_mse(s, t).item() == pytest.approx(by_hand)
    student, teacher = np.array([[1.0, 2.0, 0.5]]), np.array([[0.0, 3.0, 1.0]])
    p = np.exp(teacher) / np.exp(teacher).sum()
    q = np.exp(2 * student) / np.exp(2 * student).sum()
    kl = float((p * np.log(p / q)).sum())
    assert listwise_kl(torch.tensor(student), torch.tensor(teacher), scale=2.0).item() == pytest.approx(kl, rel=1e-6)
    # a padded candidate changes nothing
    padded = listwise_kl(torch.tensor([[1.0, 2.0, 0.5, 9.0]]), torch.tensor([[0.0, 3.0, 1.0, -9.0]]), scale=2.0,
                         mask=torch.tensor([[True, True, True, False]]))
    assert padded.item() == pytest.approx(kl, rel=1e-6)
    with pytest.raises(ValueError, match="alignment_mse"):
        alignment_mse(s, t[:, :2])


def test_student_trains_saves_and_exports_as_a_dense_model(space, tiny_bert, tmp_path):
    from index_build.export import export_student
    from models.encoders import DenseEncoder

    col, sp = space
    texts = [d.title for d in col.docs] + list(col.queries.values())
    parts = sp.query_parts(texts)
    student = new_asymmetric_student(tiny_bert, sp.names, sp.dims)
    assert isinstance(student, AsymmetricStudent) and student.config.dim == sum(sp.dims)
    init_maps_by_ridge(student, texts, parts)
    q_teacher, docs = np.hstack(parts), sp.doc_vectors()
    before = alignment_mse(torch.from_numpy(encode_queries(student, texts)), torch.from_numpy(q_teacher)).item()
    pools, scores = teacher_pools(parts, sp.doc_parts(), BM25Index.build(col.doc_texts()), texts, 10)
    history: list[dict] = []
    result = train_asymmetric(student, texts, q_teacher, pools, scores, docs,
                              AsymmetricConfig(epochs=3, batch=8, lr=3e-4, pool_size=8, eval_every=5, kl_weight=0.0),
                              lambda m: -alignment_mse(torch.from_numpy(encode_queries(m, texts)),
                                                       torch.from_numpy(q_teacher)).item(), history)
    after = alignment_mse(torch.from_numpy(encode_queries(student, texts)), torch.from_numpy(q_teacher)).item()
    # trained on alignment alone, the best checkpoint is a closer copy of the teacher than the ridge start
    assert result["steps"] >= 20 and after < before, history
    # a pass draws each query as often as ``draws`` says: here only the first two, twice each
    draws = np.zeros(len(texts), np.int64)
    draws[:2] = 2
    seen: list[str] = []
    encode = student.encode_queries
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(student, "encode_queries", lambda batch: seen.extend(batch) or encode(batch))
        short = train_asymmetric(student, texts, q_teacher, pools, scores, docs,
                                 AsymmetricConfig(epochs=2, batch=2, eval_every=100), None, [], draws=draws)
    assert short["steps"] == 4 and sorted(seen) == sorted(texts[:2] * 4)
    with pytest.raises(ValueError, match="draws"):
        train_asymmetric(student, texts, q_teacher, pools, scores, docs, AsymmetricConfig(), None, [],
                         draws=draws[:3])
    vecs = encode_queries(student, texts[:4])
    start = 0
    for dim in sp.dims:  # each part is unit-norm, as the members' own vectors
        np.testing.assert_allclose(np.linalg.norm(vecs[:, start : start + dim], axis=1), 1.0, atol=1e-5)
        start += dim

    student.save(tmp_path / "student")
    again = load_student(tmp_path / "student")
    assert isinstance(again, AsymmetricStudent)
    np.testing.assert_allclose(encode_queries(again, texts[:4]), vecs, atol=1e-6)
    report = export_student(tmp_path / "student", tmp_path / "onnx", int8=False, parity_texts=texts[:6])
    assert report.max_abs_diff < 1e-4
    served = DenseEncoder(tmp_path / "onnx")
    assert served.dim == sum(sp.dims)
    np.testing.assert_allclose(served.encode_queries(texts[:4]), vecs, atol=1e-4)


def test_average_checkpoint_is_the_mean_of_the_second_half_checks(space, tiny_bert):
    """checkpoint = "average" keeps the mean of the parameters at the checks with step >= steps / 2."""
    col, sp = space
    texts = [d.title for d in col.docs] + list(col.queries.values())
    parts = sp.query_parts(texts)
    student = new_asymmetric_student(tiny_bert, sp.names, sp.dims)
    init_maps_by_ridge(student, texts, parts)
    pools, scores = teacher_pools(parts, sp.doc_parts(), BM25Index.build(col.doc_texts()), texts, 10)
    seen: list[dict] = []

    def dev_eval(model) -> float:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return float(len(seen))  # rises at every check: "best" would keep the last

    cfg = AsymmetricConfig(epochs=1, batch=len(texts) // 8, lr=3e-4, pool_size=8, eval_every=2, checkpoint="average")
    log: list[dict] = []
    result = train_asymmetric(student, texts, np.hstack(parts), pools, scores, sp.doc_vectors(), cfg, dev_eval, log)
    assert result["steps"] == 8 and result["averaged_steps"] == [4, 6, 8] and result["checkpoint"] == "average"
    assert [e["step"] for e in log] == [0, 2, 4, 6, 8, "average"] and log[-1]["of_steps"] == [4, 6, 8]
    checks = seen[2:5]  # steps 4, 6, 8 (seen[0] is step 0; the last call scores the average)
    final = student.state_dict()
    for name, value in final.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(c[name] for c in checks) / 3, rtol=1e-5, atol=1e-6)
    # the average is none of the checks, and the last dev call scored it
    assert any(not torch.equal(v, checks[-1][k]) for k, v in final.items() if v.is_floating_point())
    assert all(torch.equal(v, seen[-1][k]) for k, v in final.items())


def test_layers_mlp_head_starts_at_the_linear_head_then_fits_trains_and_exports(space, tiny_bert, tmp_path):
    """The residual MLPs start at zero (the linear head exactly), the frozen-state fit brings
    each part closer to its member, training moves them, and the graph serves the same vectors."""
    from index_build.export import export_student
    from models.encoders import DenseEncoder

    col, sp = space
    texts = [d.title for d in col.docs] + list(col.queries.values())
    parts = sp.query_parts(texts)
    linear = new_asymmetric_student(tiny_bert, sp.names, sp.dims)
    init_maps_by_ridge(linear, texts, parts)
    mlp = new_asymmetric_student(tiny_bert, sp.names, sp.dims, head="layers-mlp", head_hidden=32)
    assert mlp.config.extra["asymmetric"]["head"] == "layers-mlp"
    start = init_maps_by_ridge(mlp, texts, parts, head_epochs=0)
    assert "residual" not in start or start["residual"] == start["ridge"]
    np.testing.assert_allclose(encode_queries(mlp, texts), encode_queries(linear, texts), atol=1e-6)
    fitted = init_maps_by_ridge(mlp, texts, parts, head_epochs=40)
    assert all(f > r for f, r in zip(fitted["residual"], fitted["ridge"])), fitted
    assert np.abs(encode_queries(mlp, texts) - encode_queries(linear, texts)).max() > 1e-3
    before = [p.detach().clone() for p in mlp.residuals.parameters()]
    pools, scores = teacher_pools(parts, sp.doc_parts(), BM25Index.build(col.doc_texts()), texts, 10)
    train_asymmetric(mlp, texts, np.hstack(parts), pools, scores, sp.doc_vectors(),
                     AsymmetricConfig(epochs=1, batch=8, pool_size=8, eval_every=100), None, [])
    assert any((a != b).any() for a, b in zip(before, mlp.residuals.parameters()))  # trained end to end
    vecs = encode_queries(mlp, texts[:4])
    mlp.save(tmp_path / "student")
    again = load_student(tmp_path / "student")
    assert isinstance(again, AsymmetricStudent) and again.head_kind == "layers-mlp"
    np.testing.assert_allclose(encode_queries(again, texts[:4]), vecs, atol=1e-6)
    report = export_student(tmp_path / "student", tmp_path / "onnx", int8=True, per_channel=True,
                            parity_texts=texts[:6])
    assert report.max_abs_diff < 1e-4 and report.int8_max_abs_diff < 0.05
    np.testing.assert_allclose(DenseEncoder(tmp_path / "onnx").encode_queries(texts[:4]), vecs, atol=1e-4)


def test_query_token_map_recovers_a_linear_map_and_aligns_tokens():
    from index_build.asymmetric import aligned_query_tokens, fit_query_token_map
    from models.encoders import project_query_tokens

    rng = np.random.default_rng(0)
    hidden, dim, q_len = 12, 4, 8
    true = rng.normal(size=(hidden, dim)).astype(np.float32)
    states = [rng.normal(size=(n, hidden)).astype(np.float32) for n in (3, 5, 12)]  # [CLS] pieces [SEP]
    colbert = np.zeros((3, q_len, dim), np.float32)
    for q, h in zip(colbert, states):
        pieces = min(len(h) - 2, q_len - 3)  # ColBERT keeps q_len - 3 pieces after [CLS] [Q]
        rows = h[np.r_[np.arange(pieces + 1), len(h) - 1]] @ true
        q[np.r_[0, np.arange(2, pieces + 3)]] = rows
        q[1] = 1.0  # the [Q] marker's row has no counterpart
    x, y = aligned_query_tokens(states, colbert)
    assert len(x) == len(y) == 3 + 5 + (q_len - 3 + 2)
    w, cos = fit_query_token_map(states, colbert, alpha=1e-6)
    np.testing.assert_allclose(w, true, atol=1e-3)
    assert cos > 0.9999
    # the service's projection: normalized rows, zero rows past the query
    mask = np.array([[1, 1, 1, 0]], np.int64)
    tokens = project_query_tokens(np.stack([np.vstack([states[0], np.ones((1, hidden))])]), mask, w)
    np.testing.assert_allclose(np.linalg.norm(tokens[0, :3], axis=1), 1.0, atol=1e-5)
    assert not tokens[0, 3].any()


def test_pool_batch_leaves_a_pseudo_querys_source_out_and_flattens_its_teacher():
    from index_build.asymmetric import _pool_batch

    pools = [np.array([4, 7, 9]), np.array([1, 2, 3])]
    t_scores = [np.array([9.0, 1.0, 2.0], np.float32), np.array([3.0, 1.0, 2.0], np.float32)]
    sources = np.array([4, -1])  # query 0 was cut from document 4; query 1 is a real query
    rng = np.random.default_rng(0)
    cand, target = _pool_batch(np.array([0, 1]), pools, t_scores, 4, rng)
    assert cand.tolist() == [[4, 7, 9, -1], [1, 2, 3, -1]] and target[0, :3].tolist() == [9.0, 1.0, 2.0]
    cand, target = _pool_batch(np.array([0, 1]), pools, t_scores, 4, rng, sources, drop_source=True, temperature=2.0)
    assert cand.tolist() == [[7, 9, -1, -1], [1, 2, 3, -1]]
    assert target[0, :2].tolist() == [0.5, 1.0] and target[1, :3].tolist() == [3.0, 1.0, 2.0]  # real: as it was
    # a larger pool than asked for keeps the teacher's top half of what remains, then samples the rest
    big = [np.arange(10)]
    cand, _ = _pool_batch(np.array([0]), big, [np.arange(10, 0, -1).astype(np.float32)], 4, rng, np.array([0]), True)
    assert 0 not in cand[0] and cand[0, :2].tolist() == [1, 2]


def test_training_passes_each_querys_source_and_the_pseudo_kl_settings(space, tiny_bert):
    import index_build.asymmetric as asym

    col, sp = space
    texts = [d.title for d in col.docs][:6]
    parts = sp.query_parts(texts)
    pools, scores = teacher_pools(parts, sp.doc_parts(), BM25Index.build(col.doc_texts()), texts, 5)
    student = new_asymmetric_student(tiny_bert, sp.names, sp.dims)
    sources = np.arange(len(texts))  # each title's source is its own document
    calls: list[tuple] = []
    real = asym._pool_batch
    cfg = AsymmetricConfig(epochs=1, batch=3, pool_size=4, eval_every=100, pseudo_kl_pool="without-source",
                           pseudo_kl_temperature=2.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asym, "_pool_batch", lambda *a: calls.append(a[5:]) or real(*a))
        train_asymmetric(student, texts, np.hstack(parts), pools, scores, sp.doc_vectors(), cfg, None, [],
                         sources=sources)
    assert len(calls) == 2 and all(c[0] is sources or (c[0] == sources).all() for c in calls)
    assert {c[1:] for c in calls} == {(True, 2.0)}
    with pytest.raises(ValueError, match="sources"):
        train_asymmetric(student, texts, np.hstack(parts), pools, scores, sp.doc_vectors(), cfg, None, [],
                         sources=sources[:2])
