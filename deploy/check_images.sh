#!/usr/bin/env bash
# Build the images with podman from a local Debian base, run them and check them; used by tests/test_container.py.
#
#   deploy/check_images.sh base       the base image: Debian bookworm + python3.11 made by mmdebstrap, imported
#   deploy/check_images.sh prometheus a Prometheus image from Debian's `prometheus` package (no registry needed)
#   deploy/check_images.sh build T..  build Dockerfile targets (gateway, gateway-full, worker-cpu), timed
#   deploy/check_images.sh run T PORT start target T's image on PORT (host network) and wait for /readyz
#   deploy/check_images.sh sizes      image sizes
#   deploy/check_images.sh clean      remove the containers, the images and the storage
#
# Needs root, podman + runc + mmdebstrap (apt-get install -y podman buildah runc mmdebstrap). No registry is needed: the base image is made from Debian's packages; the mirror is read from this
# machine's apt sources and the package-index settings from `pip config list`, both at run time (never written
# into the repository). Storage stays under PONDER_PODMAN_DIR (default /tmp/ponder-podman); CONTAINERS_CONF and
# CONTAINERS_STORAGE_CONF point there too, so a plain `podman` (as podman-compose runs it) sees the same images.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${PONDER_PODMAN_DIR:-/tmp/ponder-podman}
BASE=localhost/ponder-base:python3.11-bookworm
PIP=${PIP:-.venv/bin/pip}
mkdir -p "$DIR"
export CONTAINERS_CONF="$DIR/containers.conf"
cat > "$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_STORAGE_CONF="$DIR/storage.conf"
cat > "$CONTAINERS_STORAGE_CONF" <<CONF
[storage]
driver = "overlay"
graphroot = "$DIR/storage"
runroot = "$DIR/run"
CONF
PODMAN=(podman --root "$DIR/storage" --runroot "$DIR/run" --storage-driver overlay)

log() { echo "check_images: $*" >&2; }

debian_mirror() {  # the first Debian mirror of this machine's apt sources
  local uri
  uri=$(grep -rhoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
          /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}' | grep -v security | head -n 1 || true)
  [ -n "$uri" ] || { log "no Debian mirror in the apt sources"; exit 2; }
  echo "$uri"
}

debian_image() {  # debian_image NAME PACKAGES [IMPORT-ARGS]: a minimal bookworm with PACKAGES, imported as NAME
  local name=$1 packages=$2 tar="$DIR/rootfs-${1//[^a-z0-9]/_}.tar"
  shift 2
  if "${PODMAN[@]}" image exists "$name"; then log "image $name exists"; return; fi
  [ -f "$tar" ] || mmdebstrap --variant=minbase --include="$packages" bookworm "$tar" \
      "deb $(debian_mirror) bookworm main" > "$DIR/mmdebstrap.log" 2>&1 || { tail -n 20 "$DIR/mmdebstrap.log"; exit 1; }
  "${PODMAN[@]}" import "$@" "$tar" "$name" >/dev/null
  log "image $name imported"
}

cmd_base() {  # the stand-in of python:3.11-slim
  debian_image "$BASE" ca-certificates,python3,python3-venv,libpython3.11
}

cmd_prometheus() {  # the stand-in of prom/prometheus: Debian's build (2.42), same entrypoint and data folder
  debian_image localhost/ponder-prometheus:bookworm ca-certificates,prometheus \
    --change 'ENTRYPOINT ["/usr/bin/prometheus"]' --change 'WORKDIR /var/lib/prometheus' \
    --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml"]'
}

pip_conf() {  # this machine's pip settings as a pip.conf for the build (mounted, never part of an image)
  local cert
  cert=$("$PIP" config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)
  {
    echo "[global]"
    "$PIP" config list 2>/dev/null | sed -nE "s/^(:env:|global)\.([a-z-]+)='(.*)'$/\2 = \3/p" \
      | grep -vE '^(cert|constraint) ' | sort -u
    echo "cert = /etc/ssl/certs/host-ca.crt"
  } > "$DIR/pip.conf"
  VOLUMES=(-v "$DIR/pip.conf:/etc/pip.conf:ro" -v "$cert:/etc/ssl/certs/host-ca.crt:ro")
  local path  # local find-links / file:// indexes named in the settings travel as read-only mounts
  for path in $(grep -oE '(file://)?/opt/[^ ]+' "$DIR/pip.conf" | sed -E 's#^file://##; s#/simple$##' | sort -u); do
    [ -e "$path" ] && VOLUMES+=(-v "$path:$path:ro")
  done
}

cmd_build() {
  cmd_base
  pip_conf
  local target start
  for target in "$@"; do
    start=$SECONDS
    "${PODMAN[@]}" build --network host --format docker --target "$target" -t "localhost/ponder-$target:check" \
      --build-arg PYTHON_IMAGE="$BASE" --build-arg TORCH_INDEX_URL=https://pypi.org/simple "${VOLUMES[@]}" . \
      > "$DIR/build-$target.log" 2>&1 || { tail -n 30 "$DIR/build-$target.log" >&2; exit 1; }
    echo "built $target in $((SECONDS - start)) s"
  done
}

cmd_run() {
  local target=$1 port=$2 name="ponder-check-$1"
  shift 2
  "${PODMAN[@]}" rm -f "$name" >/dev/null 2>&1 || true
  "${PODMAN[@]}" run -d --name "$name" --network host -e PONDER_PORT="$port" -e PONDER_TORCH_THREADS=1 "$@" \
    "localhost/ponder-$target:check" >/dev/null
  local i
  for i in $(seq 1 180); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then log "$name ready on $port"; return; fi
    if [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$name")" != true ]; then break; fi
    sleep 1
  done
  "${PODMAN[@]}" logs "$name" 2>&1 | tail -n 30 >&2
  log "$name did not become ready"; exit 1
}

cmd_sizes() {
  "${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep ponder-
}

cmd_clean() {
  "${PODMAN[@]}" rm -af >/dev/null 2>&1 || true
  "${PODMAN[@]}" rmi -af >/dev/null 2>&1 || true
  rm -rf "$DIR/storage" "$DIR/run"
}

case "${1:-}" in
  base) cmd_base ;;
  prometheus) cmd_prometheus ;;
  build) shift; cmd_build "$@" ;;
  run) shift; cmd_run "$@" ;;
  logs) "${PODMAN[@]}" logs "ponder-check-$2" ;;
  sizes) cmd_sizes ;;
  clean) cmd_clean ;;
  *) echo "usage: $0 base|prometheus|build TARGET...|run TARGET PORT [PODMAN-RUN-ARGS]|logs TARGET|sizes|clean" >&2; exit 2 ;;
esac
