"""Container health check: exit 0 when the service's ``/ready`` answers 200, else 1.

Used by the ``HEALTHCHECK`` of ``docker/Dockerfile.service`` and the ``api`` healthcheck in
``docker-compose.yml`` (python:3.11-slim has no curl). Standard library only; the port is
``NRS_PORT`` (default 8000).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('NRS_PORT', '8000')}/ready"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
