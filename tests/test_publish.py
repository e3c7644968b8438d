"""A build writes its results next to its work; benchmarks/publish_build.py copies them into
the repository's results folder."""

from __future__ import annotations

from pathlib import Path

from benchmarks.publish_build import publish
from index_build.config import load_config


def test_results_go_next_to_the_work_by_default(tmp_path: Path):
    cfg = load_config(overrides=[f'work_dir="{tmp_path}/work"'])
    assert cfg.results_path == tmp_path / "work" / "results"
    cfg = load_config(overrides=[f'work_dir="{tmp_path}/work"', f'evaluate.results_dir="{tmp_path}/elsewhere"'])
    assert cfg.results_path == tmp_path / "elsewhere"
    for name in ("scifact.toml", "scifact-full.toml", "labelfree-scifact.toml", "labelfree-dl19.toml"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
        assert "benchmarks" not in cfg.results_path.parts, name


def test_publish_copies_results_files(tmp_path: Path):
    results = tmp_path / "work" / "results"
    results.mkdir(parents=True)
    (results / "tiny.json").write_text('{"a": 1}\n')
    (results / "tiny.md").write_text("| a |\n")
    (results / "scratch.tmp").write_text("not a result")
    dest = tmp_path / "published"
    copied = publish(results, dest)
    assert sorted(p.name for p in copied) == ["tiny.json", "tiny.md"]
    assert sorted(p.name for p in dest.iterdir()) == ["tiny.json", "tiny.md"]
    assert (dest / "tiny.json").read_text() == '{"a": 1}\n'


def test_label_free_variants_load_and_keep_their_own_work():
    from benchmarks.label_free import VARIANTS

    repo = Path(__file__).resolve().parents[1]
    for name, (base, overrides, about) in VARIANTS.items():
        cfg = load_config(repo / "configs" / f"labelfree-{base}.toml", overrides)
        plain = load_config(repo / "configs" / f"labelfree-{base}.toml")
        assert about and cfg.work_dir != plain.work_dir and cfg.artifact_dir != plain.artifact_dir, name
        assert cfg.evaluate.name == f"labelfree-{name}", name
