#!/usr/bin/env bash
# The whole compose check on a CPU machine, with podman-compose (PyPI) and images built from local bases:
#   1. images (deploy/check_images.sh, layers reused): gateway, worker-cpu, Prometheus from Debian's package;
#   2. the default model exported as a `--kind python-torch` Triton repository, and its in-process features
#      of the fixture scene (`ponder features`) as the reference;
#   3. `podman-compose -f docker-compose.yml -f deploy/compose.cpu.yml up -d` (gateway + CPU Triton worker +
#      Prometheus), one request through the gateway to the worker compared with the reference (1e-4), one
#      worker's throughput, Prometheus's scrape health, image sizes; then `down`.
#
#   deploy/check_compose.sh [SCENE]      (default: the fixture room; PONDER_SHARED as for the tests)
#
# Ports: PONDER_CHECK_PORT (gateway, default 18000) and PONDER_CHECK_PROMETHEUS_PORT (19090), on 127.0.0.1.
# PONDER_CHECK_KEEP=1 leaves the stack up; PONDER_CHECK_OVERRIDE=FILE adds a compose file of yours.
# Needs root + podman/runc/mmdebstrap, like check_images.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${PONDER_PODMAN_DIR:-/tmp/ponder-podman}
PY=${PY:-.venv/bin/python}
SHARED=${PONDER_SHARED:-$(cd .. && pwd)/shared}
SCENE=${1:-$SHARED/reference/fixtures/spunet_v1m1_seg/input.npz}
PORT=${PONDER_CHECK_PORT:-18000}
PROM_PORT=${PONDER_CHECK_PROMETHEUS_PORT:-19090}
PROJECT=ponder-check
log() { echo "check_compose: $*" >&2; }
[ -f "$SCENE" ] || { log "no scene at $SCENE"; exit 2; }

deploy/check_images.sh build gateway worker-cpu
start=$SECONDS
deploy/check_images.sh prometheus
echo "prometheus image in $((SECONDS - start)) s"
export CONTAINERS_CONF="$DIR/containers.conf" CONTAINERS_STORAGE_CONF="$DIR/storage.conf"

start=$SECONDS
rm -rf "$DIR/triton-repo"
"$PY" -m ponder.cli export triton-repo model/default_model --kind python-torch -o "$DIR/triton-repo" \
  > "$DIR/export.log" 2>&1 || { tail -n 20 "$DIR/export.log" >&2; exit 1; }
chmod -R a+rX "$DIR/triton-repo"
"$PY" -m ponder.cli features "$SCENE" -o "$DIR/reference.npy" > "$DIR/reference.log" 2>&1 \
  || { tail -n 20 "$DIR/reference.log" >&2; exit 1; }
echo "repository exported and reference computed in $((SECONDS - start)) s"

export PONDER_GATEWAY_IMAGE=localhost/ponder-gateway:check PONDER_WORKER_IMAGE=localhost/ponder-worker-cpu:check \
  PROMETHEUS_IMAGE=localhost/ponder-prometheus:bookworm PONDER_TRITON_REPO="$DIR/triton-repo" \
  PONDER_PORT="$PORT" PROMETHEUS_PORT="$PROM_PORT"
COMPOSE=("$(dirname "$PY")/podman-compose" -p "$PROJECT" -f docker-compose.yml -f deploy/compose.cpu.yml)
[ -z "${PONDER_CHECK_OVERRIDE:-}" ] || COMPOSE+=(-f "$PONDER_CHECK_OVERRIDE")
down() {
  "${COMPOSE[@]}" logs > "$DIR/compose.log" 2>&1 || true
  [ "${PONDER_CHECK_KEEP:-0}" = 1 ] || "${COMPOSE[@]}" down -t 10 > "$DIR/compose-down.log" 2>&1 || true
}
trap down EXIT
trap 'exit 143' TERM INT  # so that EXIT's `down` runs on a signal too
"${COMPOSE[@]}" down -t 5 > /dev/null 2>&1 || true
start=$SECONDS
"${COMPOSE[@]}" up -d --no-build > "$DIR/compose-up.log" 2>&1 || { tail -n 30 "$DIR/compose-up.log" >&2; exit 1; }
echo "compose up returned in $((SECONDS - start)) s"
echo "load before the requests: $(uptime)"
status=0
"$PY" deploy/compose_probe.py --gateway "http://127.0.0.1:$PORT" --prometheus "http://127.0.0.1:$PROM_PORT" \
  --scene "$SCENE" --reference "$DIR/reference.npy" || status=$?
echo "stack ready-to-probed in $((SECONDS - start)) s; load after: $(uptime)"
deploy/check_images.sh sizes
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep ponder-prometheus || true
if [ "$status" != 0 ]; then
  "${COMPOSE[@]}" ps >&2 || true
  "${COMPOSE[@]}" logs --tail 40 >&2 || true
fi
exit "$status"
