"""The ColBERT student's PCA projection init: the principal directions of the checkpoint's
token states, keyed and recorded by the distill stage, validated in the config."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from index_build.config import load_config  # noqa: E402
from index_build.stages import Pipeline, train_recipe_key  # noqa: E402
from index_build.students import new_student, set_seed  # noqa: E402
from index_build.train import TrainConfig  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402

DOCS = ["Tumor cells divide fast, and spread.", "The weather is fine today.", "Vitamin D and bone density.",
        "Cancer therapy targets dividing cells.", "Fractures heal with calcium and rest."] * 4


def test_pca_projection_keeps_the_top_principal_directions(tiny_bert):
    set_seed(13)
    student = new_student("colbert", tiny_bert, dim=8)
    student.train()
    kept = student.init_projection_pca(DOCS)
    w = student.proj.weight.detach().double()
    assert torch.allclose(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-5)  # orthonormal rows
    assert student.training  # the mode it had
    # the directions of largest variance: projecting the centered states keeps more variance
    # than any other 8 orthonormal directions, e.g. the next 8
    states = []
    with torch.no_grad():
        from index_build.students import to_torch

        batch = student.tokenizer.encode_colbert_docs(DOCS, student.config.max_doc_len)
        h = student.eval().hidden(**to_torch(batch)).double()
        keep = torch.from_numpy(student.tokenizer.colbert_doc_keep_mask(batch))
        states = h[keep]
    x = states - states.mean(0)
    total = x.pow(2).sum()
    assert float((x @ w.T).pow(2).sum() / total) == pytest.approx(kept, abs=1e-4)
    _, _, vt = torch.linalg.svd(x, full_matrices=False)
    assert float((x @ vt[8:16].T).pow(2).sum() / total) < kept
    assert 0.0 < kept <= 1.0


def test_pca_projection_needs_dim_within_hidden(tiny_bert):
    student = new_student("colbert", tiny_bert, dim=64)  # the tiny model's states are 32 wide
    with pytest.raises(ValueError, match="dim <= hidden size"):
        student.init_projection_pca(DOCS)


def test_proj_init_config_and_keys(tiny_beir, tiny_bert, tmp_path):
    default = train_recipe_key(TrainConfig())
    assert json.loads(default)["proj_init"] == "random"  # every recipe field is part of the key
    assert train_recipe_key(TrainConfig(proj_init="pca")) != default
    with pytest.raises(ValueError, match="proj_init must be one of random, pca"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'train.colbert.proj_init="svd"'))
    with pytest.raises(ValueError, match="ColBERT student only"):
        load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'train.dense.proj_init="pca"'))


def test_distill_records_the_pca_init(tiny_beir, tiny_bert, tmp_path):
    cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'students.kinds=["colbert"]',
                                               "students.colbert_dim=16", 'train.colbert.proj_init="pca"'))
    p = Pipeline(cfg, progress=False)
    p.mine()
    rec = p.distill("colbert").result
    assert rec["proj_init"] == "pca" and 0.0 < rec["proj_variance_kept"] <= 1.0
    random_cfg = load_config(overrides=tiny_overrides(tiny_beir, tiny_bert, tmp_path, 'students.kinds=["colbert"]',
                                                      "students.colbert_dim=16"))
    assert Pipeline(random_cfg, progress=False).distill_key("colbert") != p.distill_key("colbert")
