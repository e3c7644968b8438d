"""The hybrid first stage uses the fusion weight the builder tuned (manifest), unless the
settings override it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.artifacts import load_manifest
from service.search import retrieval_weights
from tests.service_fixtures import build_service_artifacts, make_settings


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_beir, tiny_bert):
    return build_service_artifacts(tmp_path_factory, tiny_beir, tiny_bert)


def test_manifest_weights_by_default_and_settings_override(artifacts):
    manifest = load_manifest(artifacts.first)
    tuned = manifest.indexes["hybrid"]
    assert tuned["tuned_on"] and 0.0 <= tuned["dense_weight"] <= 1.0
    assert retrieval_weights(make_settings(artifacts.first), manifest).hybrid == (tuned["dense_weight"],
                                                                         tuned["sparse_weight"])
    s = make_settings(artifacts.first, hybrid_dense_weight=0.2, hybrid_sparse_weight=0.8)
    assert retrieval_weights(s, manifest).hybrid == (0.2, 0.8)


def test_half_set_weights_are_rejected(artifacts):
    with pytest.raises(ValidationError, match="set both hybrid_dense_weight and hybrid_sparse_weight"):
        make_settings(artifacts.first, hybrid_dense_weight=0.2)
