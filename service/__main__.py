"""``python -m service`` / ``search-service``: run the app under uvicorn with the ``NRS_*``
settings. SIGTERM / SIGINT trigger uvicorn's graceful shutdown: stop accepting, let
in-flight requests finish for up to ``graceful_shutdown_s``, run the lifespan shutdown,
exit 0. A start-up failure (bad settings, missing or corrupt artifact) exits non-zero."""

from __future__ import annotations

import logging
import os
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

logger = logging.getLogger("service")


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM / SIGINT ends in exit code 0 once the graceful
    shutdown is done (uvicorn >= 0.29 re-raises the signal afterwards, so the process would
    die by it and report -15 to its supervisor)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


class StartupFailureFilter(logging.Filter):
    """Drops uvicorn's copies of a start-up failure that the lifespan already reported in one
    line (a :class:`~service.errors.StartupError`: bad or missing artifact): the traceback
    Starlette hands to uvicorn and uvicorn's "Application startup failed" line. Any other
    failure keeps its traceback: that one is a bug to read."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Traceback") and "service.errors.StartupError" in message:
            self.reported = True
            return False
        return not (self.reported and message.startswith("Application startup failed"))


#: thread-count variables of the native libraries under NumPy and FAISS (OpenMP, OpenBLAS, MKL)
NATIVE_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_native_threads(threads: int) -> None:
    """Give NumPy's BLAS and OpenMP ``threads`` threads per call (unless the environment
    already says), before they are first imported. The service runs requests in parallel
    worker threads; a BLAS call that also used every core in each of them would oversubscribe
    the CPUs under load. ``threads = 0`` leaves the libraries' defaults."""
    if threads > 0:
        for name in NATIVE_THREAD_VARS:
            os.environ.setdefault(name, str(threads))


#: glibc mallopt parameter: the most malloc arenas
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (``mallopt(M_ARENA_MAX)``) before the service
    starts its threads; ``0`` leaves glibc's default. Whether the cap was set (False off glibc)."""
    from service.native import libc

    c = libc()
    if arenas <= 0 or c is None or not hasattr(c, "mallopt"):
        return False
    return bool(c.mallopt(M_ARENA_MAX, arenas))


def usage() -> str:
    """``--help``: how the service is configured (every setting is an ``NRS_*`` variable)."""
    from service.settings import Settings

    lines = [__doc__.split("\n\n")[0].replace("\n", " ").replace("``", ""), "",
             "usage: python -m service   (no arguments: every setting is an environment variable)", ""]
    for name, field in Settings.model_fields.items():
        default = "required" if field.is_required() else f"default {field.default!r}"
        about = " ".join((field.description or "").split())
        lines.append(f"  NRS_{name.upper():<32} {default}{': ' + about if about else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Read settings, configure JSON logging, serve until signalled; the exit code."""
    from service.logs import configure_logging
    from service.settings import Settings

    args = sys.argv[1:] if argv is None else argv
    if args:
        if args[0] in ("-h", "--help"):
            print(usage())
            return 0
        print(f"python -m service takes no arguments (got {' '.join(args)}); settings are NRS_* environment "
              "variables, see --help", file=sys.stderr)
        return 2
    try:
        settings = Settings()  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = [
            f"  NRS_{'_'.join(str(p) for p in err['loc']).upper() or '*'}: {err['msg']}" for err in exc.errors()
        ]
        print("invalid service settings (NRS_* environment variables):\n" + "\n".join(lines), file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    limit_native_threads(settings.threads)
    limit_malloc_arenas(settings.malloc_arenas)
    from service.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level, lifespan="on", timeout_graceful_shutdown=settings.graceful_shutdown_s,
    )
    startup_failures = StartupFailureFilter()
    logging.getLogger("uvicorn.error").addFilter(startup_failures)
    server = GracefulServer(config)
    server.run()
    if not server.started:
        if not startup_failures.reported:
            logger.error("the service did not start")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
