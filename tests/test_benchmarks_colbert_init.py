"""benchmarks/colbert_init.py on the tiny model: its MaxSim is the ColBERT student's own, and
a tiny TREC DL-style pool gets every row."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import colbert_init as bench  # noqa: E402


def test_student_init_projection_scores_as_the_student_does(tiny_bert):
    from index_build.students import ColbertStudent, new_student, set_seed

    set_seed(13)
    student = new_student("colbert", tiny_bert).eval()
    docs = ["cancer cells grow fast, and divide.", "the weather is fine today", "tumor"]
    q_states = [t.numpy() for t in student.token_states(["tumor cells"], queries=True)]
    d_states = [t.numpy() for t in student.token_states(docs)]
    assert q_states[0].shape[0] == student.config.colbert_query_len
    run = bench.maxsim_run({"q": q_states[0]}, dict(zip("abc", d_states)), {"q": list("abc")},
                           student.proj.weight.detach().numpy())
    with torch.inference_mode():
        dv, keep = student.encode_docs(docs)
        expected = ColbertStudent.maxsim(student.encode_queries(["tumor cells"]).expand(3, -1, -1), dv, keep)
    assert [run["q"][d] for d in "abc"] == pytest.approx(expected.tolist(), abs=1e-4)


def test_projections_are_orthonormal_where_they_should_be():
    states = np.random.default_rng(1).normal(size=(500, 16)).astype(np.float32)
    p = bench.projections(states, np.zeros((4, 16)), dim=4)
    for name in ("pca-4", "orthogonal-4"):
        assert np.allclose(p[name] @ p[name].T, np.eye(4), atol=1e-5), name


def test_evaluate_pool_reports_every_projection(tiny_bert, tmp_path, monkeypatch):
    from tests.tiny import write_trec_pool

    monkeypatch.setenv("NRS_CACHE_DIR", str(tmp_path / "cache"))
    out = bench.evaluate_pool(write_trec_pool(tmp_path), str(tiny_bert), seed=13)
    # the tiny model's states are 32 wide: PCA and the random rotation keep 32 dims, the
    # student's own projection maps them to its 128
    assert set(out["systems"]) == {"base-dense (mean pooling)", "maxsim identity-32", "maxsim pca-32",
                                   "maxsim orthogonal-32", "maxsim student-init-128"}
    assert out["queries"] > 0 and out["documents"] > 0
    for row in out["systems"].values():
        assert 0.0 <= row["nDCG@10"] <= 1.0
