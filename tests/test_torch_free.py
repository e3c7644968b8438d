"""The online path never imports torch (nor the offline builder)."""

from __future__ import annotations

import subprocess
import sys


def test_service_and_models_do_not_import_torch():
    code = (
        "import sys, importlib, pkgutil\n"
        "import models, service\n"
        "for pkg in (models, service):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "bad = [m for m in ('torch', 'transformers', 'index_build') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_config_does_not_import_torch():
    """Reading and validating a build config (the CLI's first step) stays light."""
    code = (
        "import sys\n"
        "from index_build.config import load_config\n"
        "load_config()\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
