#!/usr/bin/env bash
# Runs the deployment for real with Docker Compose v2 on a small corpus and records it in
# benchmarks/results/compose.json:
#   1. a SciFact slice (--docs documents, the test queries whose relevant documents are all in it)
#      is written to a temp dir, which becomes CORPUS_DIR;
#   2. the four images (builder, service, locust, prometheus) are built and timed, one by one;
#   3. `up -d api prometheus` with docker/compose.quickstart.yml: the one-shot builder runs
#      `index-build quickstart` on the slice, then the api starts; the api's health check is polled;
#   4. /info and /search are asked from a container on the compose network (http://api:8000),
#      and the answered query is found in the api's query log (/logs/queries.jsonl, its volume);
#   5. the `load` profile's locust runs headless for --run-time with --users users;
#   6. Prometheus' HTTP API is asked for up{job="nrs-api"}, nrs_index_documents and
#      nrs_requests_total, and for every expression of the Grafana dashboard;
#   7. `down -v` removes the containers, the network and the volumes (images are kept).
# The stack runs as its own compose project (nrs-check) on free host ports, beside any other.
# Where no Docker engine or no Compose v2 is available it prints "compose-check: skipped: ..."
# and exits 0. A failed check exits 1; the results file is written either way ("passed").
#
#   bash scripts/compose-check.sh [--docs 500] [--users 4] [--run-time 25s] [--no-cache] [--out FILE]
#
# On a machine without a registry, first run ../shared/tools/docker-local.sh and export what it
# prints last (DOCKER_BUILDKIT=0 and the torch wheel: TORCH_SPEC, TORCH_INDEX_URL). The build
# variables of .env.example (PYTHON_IMAGE, TORCH_SPEC, ...) apply; DATA_DIR picks the corpus to
# slice (default: scifact under $NRS_SHARED_DATA or ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DOCS=500 USERS=4 RUN_TIME=25s NO_CACHE=0 OUT=benchmarks/results/compose.json
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --docs) DOCS=$2; shift 2 ;;
    --users) USERS=$2; shift 2 ;;
    --run-time) RUN_TIME=$2; shift 2 ;;
    --no-cache) NO_CACHE=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "compose-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { echo "compose-check: $*" >&2; }
skip() { echo "compose-check: skipped: $*"; exit 0; }

command -v docker >/dev/null 2>&1 || skip "no docker CLI on PATH"
docker info >/dev/null 2>&1 || skip "no Docker engine answers (docker info failed)"
docker compose version >/dev/null 2>&1 || skip "no Docker Compose v2 (docker compose version failed)"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=$REPO/.venv/bin/python
DATA_DIR=${DATA_DIR:-${NRS_SHARED_DATA:-$REPO/../shared/data}/scifact}
[ -f "$DATA_DIR/corpus.jsonl" ] || { log "no corpus at $DATA_DIR/corpus.jsonl (set DATA_DIR)"; exit 2; }
case "$OUT" in /*) ;; *) OUT=$REPO/$OUT ;; esac

TMP=$(mktemp -d "${TMPDIR:-/tmp}/nrs-compose-check.XXXXXX")
chmod 755 "$TMP"  # the containers' users read the corpus slice
FACTS=$TMP/facts.tsv
: >"$FACTS"
# fact KEY JSON: one measurement (dotted keys nest) for the results file
fact() { printf '%s\t%s\n' "$1" "$2" >>"$FACTS"; }
FAILED=""
check() {  # check NAME OK(0/1) DETAIL: a named pass/fail line
  fact "checks.$1" "$([ "$2" = 1 ] && echo true || echo false)"
  if [ "$2" = 1 ]; then log "ok: $1 ($3)"; else log "FAILED: $1 ($3)"; FAILED="$FAILED $1"; fi
}
now() { date +%s.%N; }
since() { "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(now)"; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

export COMPOSE_PROJECT_NAME=nrs-check
export CORPUS_DIR=$TMP/corpus CORPUS_NAME=scifact-slice-$DOCS
export API_PORT PROMETHEUS_PORT
API_PORT=$(free_port) PROMETHEUS_PORT=$(free_port)
export API_REPLICAS=1 BUILD_THREADS=${BUILD_THREADS:-2}
export LOCUST_RESULTS_DIR=$TMP/locust LOCUST_UID LOCUST_USERS=$USERS LOCUST_SPAWN_RATE=$USERS
LOCUST_UID=$(id -u)
export LOCUST_RUN_TIME=$RUN_TIME LOCUST_MIX=none:1,default:1 LOCUST_BATCH_SHARE=0.1 LOCUST_BATCH_SIZE=4
mkdir -p "$LOCUST_RESULTS_DIR"
DC=(docker compose -f docker-compose.yml -f docker/compose.quickstart.yml --profile load --profile monitoring)
dc() { "${DC[@]}" "$@"; }

finish() {
  rc=$?
  trap - EXIT
  if [ -n "$FAILED" ] || [ "$rc" -ne 0 ]; then
    log "logs of the failed run:"
    dc logs --no-color --tail 40 >&2 || true
  fi
  t=$(now)
  dc down -v --remove-orphans >/dev/null 2>&1 || log "down -v failed"
  fact teardown_seconds "$(since "$t")"
  [ "$rc" -eq 0 ] && [ -n "$FAILED" ] && rc=1
  fact passed "$([ "$rc" -eq 0 ] && echo true || echo false)"
  mkdir -p "$(dirname "$OUT")"
  "$PY" - "$FACTS" "$OUT" <<'PY' || rc=1
import json, sys
out: dict = {}
for line in open(sys.argv[1]):
    key, _, value = line.rstrip("\n").partition("\t")
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = json.loads(value)
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")
import os
os.replace(tmp, sys.argv[2])
PY
  rm -rf "$TMP"
  log "$([ "$rc" -eq 0 ] && echo passed || echo "FAILED:$FAILED") -> $OUT"
  exit "$rc"
}
trap finish EXIT
die() { check "$1" 0 "$2"; exit 1; }

json_str() { "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }
fact command "$(json_str "bash scripts/compose-check.sh${ARGS[*]:+ ${ARGS[*]}}")"
fact started "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
fact versions.docker "$(json_str "$(docker version -f '{{.Server.Version}}')")"
fact versions.compose "$(json_str "$(docker compose version --short)")"
fact host.cpus "$(nproc)"
fact host.buildkit "$(json_str "${DOCKER_BUILDKIT:-default}")"
for var in PYTHON_IMAGE TORCH_SPEC TORCH_INDEX_URL; do
  fact "build_env.$var" "$(json_str "${!var:-(compose default)}")"
done

# -- 1. the corpus slice -----------------------------------------------------------------------
"$PY" - "$DATA_DIR" "$CORPUS_DIR" "$DOCS" >"$TMP/slice.json" <<'PY'
import json, os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(os.path.join(dst, "qrels"))
qrels: dict[str, list[str]] = {}
with open(os.path.join(src, "qrels", "test.tsv")) as f:
    next(f)
    for line in f:
        qid, did, score = line.rstrip("\n").split("\t")[:3]
        if int(score) > 0:
            qrels.setdefault(qid, []).append(did)
# the test queries, in file order, whose relevant documents fill at most half the slice ...
keep, chosen = set(), []
for qid, dids in qrels.items():
    if len(keep | set(dids)) > n // 2:
        break
    keep |= set(dids)
    chosen.append(qid)
# ... and the rest of the slice in corpus order
with open(os.path.join(src, "corpus.jsonl")) as f, open(os.path.join(dst, "corpus.jsonl"), "w") as out:
    lines = [line for line in f if line.strip()]
    picked = [line for line in lines if json.loads(line)["_id"] in keep]
    picked += [line for line in lines if json.loads(line)["_id"] not in keep][: n - len(picked)]
    out.writelines(picked)
wanted = set(chosen)
with open(os.path.join(src, "queries.jsonl")) as f, open(os.path.join(dst, "queries.jsonl"), "w") as out:
    out.writelines(line for line in f if line.strip() and json.loads(line)["_id"] in wanted)
with open(os.path.join(dst, "qrels", "test.tsv"), "w") as out:
    out.write("query-id\tcorpus-id\tscore\n")
    out.writelines(f"{q}\t{d}\t1\n" for q in chosen for d in qrels[q])
print(json.dumps({"source": os.path.basename(os.path.normpath(src)), "docs": len(picked),
                  "queries": len(chosen)}))
PY
fact corpus "$(cat "$TMP/slice.json")"
log "corpus slice: $(cat "$TMP/slice.json")"

# -- 2. images ---------------------------------------------------------------------------------
images=$(dc config --format json | "$PY" -c '
import json, sys
for name, svc in json.load(sys.stdin)["services"].items():
    if svc.get("build"):
        print(name, svc["image"])')
base=${PYTHON_IMAGE:-python:3.11-slim}
fact images.base.name "$(json_str "$base")"
fact images.base.size_mb "$(docker image inspect -f '{{.Size}}' "$base" 2>/dev/null | awk '{printf "%.1f", $1 / 1e6}' || echo null)"
while read -r svc image; do
  existed=$(docker image inspect "$image" >/dev/null 2>&1 && echo true || echo false)
  log "building $svc ($image)"
  t=$(now)
  flags=(); [ "$NO_CACHE" = 1 ] && flags=(--no-cache)
  if ! dc build "${flags[@]}" "$svc" >"$TMP/build-$svc.log" 2>&1; then
    tail -n 30 "$TMP/build-$svc.log" >&2
    die "build_$svc" "docker compose build $svc failed"
  fi
  fact "images.$svc.build_seconds" "$(since "$t")"
  fact "images.$svc.name" "$(json_str "$image")"
  fact "images.$svc.size_mb" "$(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.1f", $1 / 1e6}')"
  fact "images.$svc.existed_before" "$existed"
  fact "images.$svc.no_cache" "$([ "$NO_CACHE" = 1 ] && echo true || echo false)"
  fact "images.$svc.user" "$(json_str "$(docker image inspect -f '{{.Config.User}}' "$image")")"
done <<<"$images"
check images_built 1 "$(echo "$images" | awk '{print $1}' | tr '\n' ' ')"
api_image=$(echo "$images" | awk '$1 == "api" {print $2}')
if docker run --rm --entrypoint python "$api_image" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is not None)'; then
  check service_image_torch_free 1 "no torch module in $api_image"
else
  check service_image_torch_free 0 "torch importable in $api_image"
fi

# -- 3. up: builder, then api (health-checked), prometheus -----------------------------------------
log "up: builder (index-build quickstart on $DOCS docs), api, prometheus"
t_up=$(now)
if ! timeout 1800 "${DC[@]}" up -d api prometheus >"$TMP/up.log" 2>&1; then
  cat "$TMP/up.log" >&2
  die builder_completed "docker compose up failed (builder or api)"
fi
builder_id=$(dc ps -a -q builder)
fact builder.command "$(docker inspect -f '{{json .Config.Cmd}}' "$builder_id")"
fact builder.exit_code "$(docker inspect -f '{{.State.ExitCode}}' "$builder_id")"
# seconds between two docker timestamps (RFC 3339, nanoseconds, UTC), or from one to now
elapsed() { "$PY" -c '
import sys, time
from datetime import datetime, timezone
def t(s):
    head, _, frac = s.rstrip("Z").partition(".")
    return datetime.fromisoformat(head).replace(tzinfo=timezone.utc).timestamp() + float("0." + (frac or "0"))
print(round((t(sys.argv[2]) if len(sys.argv) > 2 else time.time()) - t(sys.argv[1]), 1))' "$@"; }
fact builder.seconds "$(elapsed "$(docker inspect -f '{{.State.StartedAt}}' "$builder_id")" \
  "$(docker inspect -f '{{.State.FinishedAt}}' "$builder_id")")"
check builder_completed 1 "exit 0"
api_id=$(dc ps -q api)
status=starting
for _ in $(seq 600); do
  status=$(docker inspect -f '{{.State.Health.Status}}' "$api_id" 2>/dev/null || echo gone)
  [ "$status" = healthy ] || [ "$status" = unhealthy ] || [ "$status" = gone ] && break
  sleep 1
done
[ "$status" = healthy ] || die api_healthy "health status $status"
fact up_to_healthy_seconds "$(since "$t_up")"
fact api.start_to_healthy_seconds "$(elapsed "$(docker inspect -f '{{.State.StartedAt}}' "$api_id")")"
fact api.user "$(json_str "$(docker exec "$api_id" id -u)")"
check api_healthy 1 "docker health status healthy"

# -- 4. /info and /search through the compose network --------------------------------------------
probe=$(dc run --rm --no-deps -T --entrypoint python locust - <<'PY'
import json, urllib.request
base = "http://api:8000"
query = json.loads(open("/data/corpus/queries.jsonl").readline())["text"]
info = json.load(urllib.request.urlopen(base + "/info", timeout=30))
req = urllib.request.Request(base + "/search", data=json.dumps({"query": query, "k": 5}).encode(),
                             headers={"content-type": "application/json"})
with urllib.request.urlopen(req, timeout=30) as r:
    status, body = r.status, json.load(r)
print(json.dumps({"url": base + "/search", "status": status, "query": query, "hits": len(body["hits"]),
                  "top_hit": body["hits"][0] if body["hits"] else None, "timings_ms": body.get("timings_ms"),
                  "default_mode": info.get("default_mode"), "info_keys": sorted(info)}))
PY
) || die search_through_network "the probe container failed"
probe=$(echo "$probe" | tail -n 1)
fact search "$probe"
hits=$(echo "$probe" | "$PY" -c 'import json, sys; d = json.load(sys.stdin); print(d["hits"] if d["status"] == 200 else 0)')
check search_through_network "$([ "$hits" -gt 0 ] && echo 1 || echo 0)" "/search answered with $hits hits"
# the answered query is in the api's query log on its volume (written by a background thread)
logged=0
for _ in $(seq 50); do
  logged=$(docker exec "$api_id" sh -c 'wc -l < /logs/queries.jsonl' 2>/dev/null || echo 0)
  [ "$logged" -gt 0 ] && break
  sleep 0.1
done
fact query_log.lines_after_probe "$logged"
check query_log_written "$([ "$logged" -gt 0 ] && echo 1 || echo 0)" "/logs/queries.jsonl holds $logged line(s)"

# -- 5. locust, headless ------------------------------------------------------------------------
log "locust: $USERS users for $RUN_TIME (mix $LOCUST_MIX)"
t=$(now)
set +e
dc run --rm --no-deps -T locust >"$TMP/locust.log" 2>&1
locust_rc=$?
set -e
fact locust.seconds "$(since "$t")"
fact locust.exit_code "$locust_rc"
fact locust.users "$USERS"
fact locust.uid "$LOCUST_UID"
fact locust.run_time "$(json_str "$RUN_TIME")"
fact locust.mix "$(json_str "$LOCUST_MIX")"
stats=$LOCUST_RESULTS_DIR/locust_stats.csv
if [ ! -f "$stats" ]; then
  tail -n 30 "$TMP/locust.log" >&2
  die locust_no_failures "no $stats"
fi
"$PY" - "$stats" >"$TMP/locust.json" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
agg = next(r for r in rows if r["Name"] == "Aggregated")
num = lambda v: None if v in ("", "N/A") else float(v)
print(json.dumps({"requests": int(agg["Request Count"]), "failures": int(agg["Failure Count"]),
                  "rps": round(num(agg["Requests/s"]), 2), "p50_ms": num(agg["50%"]), "p95_ms": num(agg["95%"]),
                  "p99_ms": num(agg["99%"]), "mean_ms": round(num(agg["Average Response Time"]), 1),
                  "by_name": {r["Name"]: {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                                          "p50_ms": num(r["50%"]), "p99_ms": num(r["99%"])}
                              for r in rows if r["Name"] != "Aggregated"}}))
PY
fact locust.stats "$(cat "$TMP/locust.json")"
read -r requests failures <<<"$("$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); print(d["requests"], d["failures"])' "$TMP/locust.json")"
check locust_no_failures "$([ "$requests" -gt 0 ] && [ "$failures" -eq 0 ] && [ "$locust_rc" -eq 0 ] && echo 1 || echo 0)" \
  "$requests requests, $failures failures, exit $locust_rc"

# -- 6. Prometheus ------------------------------------------------------------------------------
sleep 6  # one more scrape (5 s interval), so the counters cover the whole locust run
"$PY" - "http://127.0.0.1:$PROMETHEUS_PORT" "$REPO/docker/grafana/dashboards" >"$TMP/prom.json" <<'PY'
import glob, json, sys, time, urllib.parse, urllib.request
base, dashboards = sys.argv[1], sys.argv[2]

def query(expr):
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except OSError as exc:
        return {"status": "error", "error": str(exc)}

def scalar(expr):
    res = query(expr).get("data", {}).get("result", [])
    return float(res[0]["value"][1]) if res else None

deadline = time.time() + 90
up = None
while time.time() < deadline:
    up = scalar('max(up{job="nrs-api"})')
    if up == 1:
        break
    time.sleep(2)
exprs = [t["expr"] for d in sorted(glob.glob(dashboards + "/*.json"))
         for p in json.load(open(d))["panels"] for t in p.get("targets", [])]
grafana = {"expressions": len(exprs), "valid": 0, "with_data": 0, "invalid": []}
for expr in exprs:
    e = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
    e = e.replace("$rerank", ".*")
    res = query(e)
    if res.get("status") == "success":
        grafana["valid"] += 1
        grafana["with_data"] += bool(res["data"]["result"])
    else:
        grafana["invalid"].append({"expr": expr, "error": res.get("error")})
print(json.dumps({"url": "/api/v1/query (published port)", "up": up,
                  "index_documents": scalar('max(nrs_index_documents{job="nrs-api"})'),
                  "search_requests": scalar('sum(nrs_requests_total{job="nrs-api",route=~"/search.*"})'),
                  "targets": len(query('up{job="nrs-api"}').get("data", {}).get("result", [])),
                  "grafana_dashboard": grafana}))
PY
fact prometheus "$(cat "$TMP/prom.json")"
read -r up ndocs searched valid total <<<"$("$PY" -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d["up"], d["index_documents"], d["search_requests"], d["grafana_dashboard"]["valid"], d["grafana_dashboard"]["expressions"])' "$TMP/prom.json")"
check prometheus_scraped_api "$([ "$up" = 1.0 ] && [ "$searched" != None ] && echo 1 || echo 0)" \
  "up=$up, nrs_index_documents=$ndocs, nrs_requests_total{/search*}=$searched"
check grafana_exprs_valid "$([ "$valid" = "$total" ] && [ "$total" -gt 0 ] && echo 1 || echo 0)" \
  "$valid of $total dashboard expressions accepted by Prometheus"
