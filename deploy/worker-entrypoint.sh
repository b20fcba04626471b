#!/bin/sh
# Start Triton on the repository mounted at PONDER_WORKER_REPO (default /models); when nothing is mounted there
# (no config.pbtxt), serve the default model's repository exported when the image was built (onnxruntime kind in
# `worker`, python-torch in `worker-cpu`), and say so. An image without one exits with status 2 saying what to mount.
set -eu
REPO=${PONDER_WORKER_REPO:-/models}
DEFAULT=${PONDER_WORKER_DEFAULT_REPO:-/opt/ponder/default-repo}
if [ -z "$(find "$REPO" -maxdepth 2 -name config.pbtxt 2>/dev/null | head -n 1)" ]; then
  if [ ! -d "$DEFAULT" ]; then
    echo "ponder-worker: no Triton repository in $REPO (no */config.pbtxt) and no bundled one in this image." \
         "Mount one written by \`ponder export triton-repo\` at $REPO." >&2
    exit 2
  fi
  echo "ponder-worker: no Triton repository in $REPO (no */config.pbtxt); serving the bundled default model" \
       "from $DEFAULT. Mount one written by \`ponder export triton-repo\` at $REPO." >&2
  REPO=$DEFAULT
fi
exec ponder worker --triton --repo "$REPO" --host 0.0.0.0 \
  --http-port "${PONDER_TRITON_HTTP_PORT:-8000}" --grpc-port "${PONDER_TRITON_GRPC_PORT:-8001}" \
  --metrics-port "${PONDER_TRITON_METRICS_PORT:-8002}"
