"""Self-describing artifact directories: manifest schema, checksums, atomic write, verify.

An artifact directory holds everything the service needs (ONNX models, indexes, the
document store) plus ``manifest.json``, which lists every other file with its SHA-256 and
size. ``manifest.json`` is written last, so **a directory without it is never complete**.

Writing::

    with ArtifactWriter(Path("artifacts/scifact")) as w:
        DenseIndex.build(vectors).save(w.path / "dense" / "index.faiss")
        ...
        w.finalize({"corpus": {...}, "indexes": {"dense": {"type": "faiss", "path": "dense/index.faiss"}}})

Files go into a temporary sibling directory (``.scifact.tmp-<pid>-<random>``); ``finalize``
checksums them, writes the manifest and then swaps the directory into place. On Linux the
swap is one ``renameat2(RENAME_EXCHANGE)`` call: atomic, a reader sees either the old or
the new complete directory. Elsewhere the old directory is renamed aside (``.old``) and
the new one renamed in: each ``rename`` is atomic, but between the two the final path
briefly does not exist. An exception inside the ``with`` block (or a killed process)
never touches the final directory; leftover temporary siblings of dead processes are
removed by the next writer.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import re
import secrets
import shutil
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

#: Manifest schema written by this code. 2: ``artifact_version`` also covers the serving
#: sections (see :func:`artifact_version`). Version 1 manifests still load.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMAS = (1, 2)
#: Manifest sections that decide what the service serves (model files and settings, index
#: parameters, fusion and interpolation weights): part of ``artifact_version`` from schema 2 on.
SERVING_SECTIONS = ("corpus", "models", "indexes", "docstore")
MANIFEST_NAME = "manifest.json"

#: Distribution names tried, in order, for each entry of ``Manifest.versions``.
_VERSION_PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "faiss": ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tokenizers": ("tokenizers",),
    "bm25s": ("bm25s",),
    "pydantic": ("pydantic",),
    "torch": ("torch",),
    "transformers": ("transformers",),
}


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete, corrupted or of another schema."""


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class CorpusInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    checksum: str = ""
    n_docs: int = 0
    source: str = ""


class Manifest(BaseModel):
    """Contents of ``manifest.json``.

    ``models`` maps a role (``"dense"``, ``"colbert"``, ``"cross-encoder"``) to a dict with at
    least ``path`` (directory relative to the artifact root) and usually the model's
    ``encoder.json`` fields plus ``onnx_file``, ``onnx_sha256``, ``tokenizer_sha256``
    (see :func:`describe_model`). ``indexes`` maps a name (``"dense"``, ``"colbert"``,
    ``"bm25"``) to a dict with ``type`` and ``path``. ``files`` maps every relative path
    except ``manifest.json`` to its checksum and size.
    """

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    created_at: str = ""
    artifact_version: str = ""
    corpus: CorpusInfo = Field(default_factory=CorpusInfo)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    indexes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    docstore: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    build: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    #: how the builder recommends serving it: ``default`` is the mode (``first_stage``,
    #: ``rerank``) it measured best on its dev queries, used when a request names none
    serving: dict[str, Any] = Field(default_factory=dict)

    def referenced_paths(self) -> list[tuple[str, str]]:
        """``(what, relative path)`` for every model, index and docstore path it names."""
        out: list[tuple[str, str]] = []
        for role, info in self.models.items():
            base = info.get("path")
            if base is None:
                continue
            out.append((f"models.{role}.path", str(base)))
            for key in ("onnx_file", "int8_onnx_file"):
                if info.get(key):
                    out.append((f"models.{role}.{key}", _join(str(base), str(info[key]))))
        for name, info in self.indexes.items():
            if info.get("path") is not None:
                out.append((f"indexes.{name}.path", str(info["path"])))
        if self.docstore.get("path") is not None:
            out.append(("docstore.path", str(self.docstore["path"])))
        return out


# -- checksums ----------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_size`` pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, FileEntry]:
    """Checksum and size of every file under ``root`` except ``manifest.json`` (posix keys)."""
    root = Path(root)
    out: dict[str, FileEntry] = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if rel == MANIFEST_NAME or not f.is_file():
            continue
        out[rel] = FileEntry(sha256=sha256_file(f), bytes=f.stat().st_size)
    return out


def artifact_version(files: dict[str, FileEntry], serving: dict[str, Any] | None = None) -> str:
    """Short content hash (12 hex digits) of the sorted ``path:sha256`` list and, when given,
    the canonical JSON of ``serving`` (the manifest's :data:`SERVING_SECTIONS`): two
    artifacts share a version only when they serve the same results, so a re-tuned fusion or
    interpolation weight is a new version even though no file changed.

    >>> files = {"a.bin": FileEntry(sha256="0" * 64, bytes=1)}
    >>> artifact_version(files, {"indexes": {"colbert": {"weight": 0.5}}}) != artifact_version(
    ...     files, {"indexes": {"colbert": {"weight": 0.6}}})
    True
    """
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}:{files[rel].sha256}\n".encode())
    if serving is not None:
        digest.update(json.dumps(serving, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:12]


def manifest_version(manifest: Manifest) -> str:
    """The ``artifact_version`` that ``manifest``'s content implies under its schema."""
    if manifest.schema_version < 2:
        return artifact_version(manifest.files)
    dumped = manifest.model_dump(mode="json")
    return artifact_version(manifest.files, {k: dumped[k] for k in SERVING_SECTIONS})


def collect_versions() -> dict[str, str]:
    """Python and installed package versions, via ``importlib.metadata`` (imports nothing)."""
    out = {"python": platform.python_version()}
    for name, dists in _VERSION_PACKAGES.items():
        for dist in dists:
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def describe_model(
    root: Path, rel_path: str, *, onnx_file: str = "model.onnx", int8_onnx_file: str | None = None
) -> dict:
    """Manifest entry of an exported model directory ``root / rel_path``: its
    ``encoder.json`` fields plus ``path``, ``onnx_file``, ``onnx_sha256``, ``tokenizer_sha256``
    (and ``int8_onnx_file`` / ``int8_onnx_sha256`` when given)."""
    directory = Path(root) / rel_path
    config_path = directory / "encoder.json"
    try:
        entry: dict[str, Any] = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{config_path}: encoder config missing") from None
    entry.update(
        path=rel_path,
        onnx_file=onnx_file,
        onnx_sha256=sha256_file(directory / onnx_file),
        tokenizer_sha256=sha256_file(directory / "tokenizer.json"),
    )
    if int8_onnx_file:
        entry.update(int8_onnx_file=int8_onnx_file, int8_onnx_sha256=sha256_file(directory / int8_onnx_file))
    return entry


# -- reading / verifying ------------------------------------------------------------------------
def load_manifest(path: str | Path) -> Manifest:
    """Parse and schema-check ``path/manifest.json`` (no file hashing).

    Raises
    ------
    ArtifactError
        Missing directory or manifest, invalid JSON, other schema version, invalid fields.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact directory does not exist")
    manifest_path = path / MANIFEST_NAME
    try:
        data = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{path}: {MANIFEST_NAME} missing, so this is not a complete artifact (interrupted build?)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object, got {type(data).__name__}")
    found = data.get("schema_version")
    if found not in SUPPORTED_SCHEMAS:
        raise ArtifactError(
            f"{manifest_path}: schema_version {found!r} is not supported (expected one of "
            f"{', '.join(map(str, SUPPORTED_SCHEMAS))}); rebuild the artifact"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(f"{manifest_path}: invalid manifest: {exc}") from None


def verify(path: str | Path, *, deep: bool = True) -> Manifest:
    """Check an artifact directory against its manifest; return the manifest.

    Checks, stopping at the first problem: the manifest (see :func:`load_manifest`), that
    every model / index / docstore path it references is among ``files``, the artifact
    version, then that each listed file exists with the recorded size and (``deep``) the
    recorded SHA-256. Files not listed are ignored.

    Raises
    ------
    ArtifactError
        Naming the file, e.g. ``checksum mismatch for dense/index.faiss: expected ..., got ...``.
    """
    path = Path(path)
    manifest = load_manifest(path)
    for rel in manifest.files:
        _check_relative(path, rel)
    _check_references(path, manifest)
    expected_version = manifest_version(manifest)
    if manifest.artifact_version != expected_version:
        raise ArtifactError(
            f"{path}: artifact_version {manifest.artifact_version!r} does not match the file checksums "
            f"and serving sections ({expected_version!r}); the manifest was edited"
        )
    for rel, entry in sorted(manifest.files.items()):
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"{path}: file listed in the manifest is missing: {rel}")
        size = f.stat().st_size
        if size != entry.bytes:
            raise ArtifactError(f"{path}: size mismatch for {rel}: expected {entry.bytes} bytes, got {size}")
        if deep:
            got = sha256_file(f)
            if got != entry.sha256:
                raise ArtifactError(f"{path}: checksum mismatch for {rel}: expected {entry.sha256}, got {got}")
    return manifest


def _join(base: str, name: str) -> str:
    return name if base in ("", ".") else f"{base.rstrip('/')}/{name}"


def _check_relative(root: Path, rel: str) -> None:
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise ArtifactError(f"{root}: manifest lists a path outside the artifact: {rel!r}")


def _check_references(root: Path, manifest: Manifest) -> None:
    files = manifest.files
    for what, rel in manifest.referenced_paths():
        rel = rel.rstrip("/")
        prefix = "" if rel in ("", ".") else rel + "/"
        if rel not in files and not any(f.startswith(prefix) for f in files):
            raise ArtifactError(f"{root}: {what} = {rel!r} is not among the manifest's checksummed files")


# -- writing ------------------------------------------------------------------------------------
class ArtifactWriter:
    """Build an artifact in a temporary sibling directory and move it into place atomically.

    Parameters
    ----------
    final_dir
        Where the finished artifact lives. Replaced (atomically on Linux) by
        :meth:`finalize` if it exists; untouched if the build fails.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with ArtifactWriter(root / "art") as w:
    ...     _ = (w.path / "a.txt").write_text("hello")
    ...     final = w.finalize({"corpus": {"n_docs": 1}})
    >>> sorted(p.name for p in final.iterdir()), verify(final).corpus.n_docs
    (['a.txt', 'manifest.json'], 1)
    """

    def __init__(self, final_dir: str | Path) -> None:
        self.final_dir = Path(final_dir).absolute()
        self._path: Path | None = None
        self._finalized = False

    @property
    def path(self) -> Path:
        """The temporary directory to write files into (valid inside the ``with`` block)."""
        if self._path is None:
            raise RuntimeError("ArtifactWriter.path is only available inside the with-block")
        return self._path

    def __enter__(self) -> ArtifactWriter:
        parent, name = self.final_dir.parent, self.final_dir.name
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(parent, name)
        self._path = parent / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._path.mkdir()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._path is not None and self._path.exists():
            if exc_type is None and not self._finalized:
                logger.warning("%s: with-block ended without finalize(); discarding the build", self.final_dir)
            shutil.rmtree(self._path, ignore_errors=True)
        self._path = None

    def finalize(self, manifest_fields: dict[str, Any] | None = None) -> Path:
        """Checksum every file, write ``manifest.json`` last, swap into ``final_dir``.

        Parameters
        ----------
        manifest_fields
            :class:`Manifest` fields (``corpus``, ``models``, ``indexes``, ``docstore``,
            ``build``, ``training``, ...). ``files``, ``artifact_version`` and
            ``schema_version`` are computed; ``created_at`` and ``versions`` default to now
            and :func:`collect_versions` (given versions are merged over the collected ones).

        Returns
        -------
        Path
            ``final_dir``.
        """
        if self._finalized:
            raise RuntimeError("finalize() was already called")
        tmp = self.path
        fields = dict(manifest_fields or {})
        files = hash_tree(tmp)
        fields["files"] = files
        fields["schema_version"] = SCHEMA_VERSION
        fields.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        fields["versions"] = {**collect_versions(), **(fields.get("versions") or {})}
        try:
            manifest = Manifest.model_validate(fields)
        except ValidationError as exc:
            raise ArtifactError(f"{self.final_dir}: invalid manifest fields: {exc}") from None
        manifest.artifact_version = manifest_version(manifest)
        _check_references(self.final_dir, manifest)
        write_json_atomic(tmp / MANIFEST_NAME, manifest.model_dump(mode="json"))
        _fsync_dir(tmp)
        _swap_into_place(tmp, self.final_dir)
        self._finalized = True
        return self.final_dir


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to a temporary sibling of ``path``, flush it to disk, then
    rename it over ``path``: a reader sees the old file or the new one, never half of one.
    Every JSON file the project writes (manifests, stage records, results) goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)  # NaN / inf are not JSON: refused
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_into_place(new: Path, final: Path) -> None:
    if not final.exists() and not final.is_symlink():
        os.rename(new, final)
    elif _rename_exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the previous artifact
    else:
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(parent: Path, name: str) -> None:
    """Delete ``.{name}.tmp-<pid>-*`` / ``.{name}.old-<pid>-*`` left by dead processes."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-(\d+)-[0-9a-f]+$")
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
            logger.info("removing leftover %s of a dead build", entry)
            shutil.rmtree(entry, ignore_errors=True)
