"""Print the pip requirements of ``pyproject.toml`` (the base dependencies plus extras), one
per line, so a Dockerfile installs the dependencies in a layer of their own before the
project's code is copied (a code change then reuses the cached dependency layer).

    python docker/requirements.py pyproject.toml              # base (torch-free) dependencies
    python docker/requirements.py pyproject.toml train        # + the builder's extra
    python docker/requirements.py pyproject.toml gpu          # onnxruntime-gpu / faiss-gpu instead of the CPU builds

With the ``gpu`` extra, the CPU builds it replaces (``onnxruntime``, ``faiss-cpu``) are left
out: both builds install the same Python modules and must not be installed together.
Standard library only (Python >= 3.11 for ``tomllib``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

#: Extra -> base distributions it replaces.
REPLACES = {"gpu": {"onnxruntime", "faiss-cpu"}}


def dist_name(requirement: str) -> str:
    """The normalized distribution name of a requirement string.

    >>> dist_name("faiss_cpu>=1.8"), dist_name("onnxruntime-gpu >= 1.17")
    ('faiss-cpu', 'onnxruntime-gpu')
    """
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """Base dependencies, minus what the extras replace, plus the extras' dependencies."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml defines {sorted(optional)}")
    dropped = set().union(*(REPLACES.get(e, set()) for e in extras))
    out = [r for r in project["dependencies"] if dist_name(r) not in dropped]
    for extra in extras:
        out += [r for r in optional[extra] if r not in out]
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    extras = [e for arg in argv[1:] for e in re.split(r"[,\s]+", arg) if e]
    print("\n".join(requirements(Path(argv[0]), extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
