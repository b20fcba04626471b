#!/usr/bin/env bash
# The GPU check, on a GPU host, from the repo root: bash bench/gpu_check.sh [gpu_check.py options]
# Through the device tool: pack here first (bash bench/pack_spconv.sh), then two calls, since the
# 64 MiB transfer cap cannot take the fixtures and the spconv bundle together:
#   run(command="bash bench/gpu_check.sh", carry=[".gpu/reference"], timeout_s=330)  # engine/ORT/parity
#   run(command="bash bench/gpu_check.sh", carry=[".gpu/spconv"], timeout_s=330)     # spconv vs engine, targets
# (about 12 of the 15 device minutes with both machine starts; call the second at once, while it is warm)
# 1. unpacks .gpu/spconv/spconv-py312.tar.xz into a scratch folder on PYTHONPATH (Python 3.12 without spconv only)
# 2. imports spconv.pytorch first, alone, and reports what happens
# 3. runs bench/gpu_check.py's steps (env, parity, timing) and tests/test_gpu_smoke.py, each under a timeout
#    within GPU_CHECK_BUDGET seconds in all (default 300), so it never hangs (GPU_CHECK_SLOW=k: k x each timeout)
# Writes $OUT/gpu_check.log and $OUT/gpu_check.json (figures; OUT defaults to outputs/gpu_check).
# Needs the host's python3 with torch and numpy, not this project's .venv (PYTHON overrides the interpreter).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/outputs/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
JSON=$OUT/gpu_check.json
rm -f "$JSON" "$LOG"
PY=${PYTHON:-python3}
BUNDLE=${SPCONV_BUNDLE:-.gpu/spconv/spconv-py312.tar.xz}
BUDGET=${GPU_CHECK_BUDGET:-300}
SLOW=${GPU_CHECK_SLOW:-1}  # multiplies every step timeout (a loaded CPU run of --device cpu --small)
START=$SECONDS
SCRATCH=$(mktemp -d /tmp/gpu_check.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONWARNINGS=ignore::FutureWarning
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$LOG") 2>&1

# one step under `timeout`, never past the budget; its exit status goes into the JSON
step() {
    local name=$1 limit=$(($2 * SLOW))
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 10))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, the budget of ${BUDGET}s is spent"
        record "$name" skipped
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s) $(date -u +%H:%M:%S)"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "== $name: TIMED OUT after ${limit}s"
    echo "== $name: rc $rc"
    record "$name" "$rc"
    return 0
}

record() {
    "$PY" - "$JSON" "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
path, name, rc = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
data = json.loads(path.read_text()) if path.exists() else {}
data.setdefault("steps", {})[name] = rc
path.write_text(json.dumps(data, indent=1))
EOF
}

echo "gpu_check on $(hostname) at $(date -u +%FT%TZ); python: $("$PY" -V 2>&1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# 1. spconv: the host's own if it has one, else the bundle (built for Python 3.12)
if "$PY" -c "import spconv" 2>/dev/null; then
    echo "spconv: the interpreter has its own; the bundle is not used"
elif [ -f "$BUNDLE" ]; then
    if "$PY" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))"; then
        mkdir -p "$SCRATCH/site"
        step unpack_spconv 120 tar -C "$SCRATCH/site" -xJf "$BUNDLE"
        export PYTHONPATH="$SCRATCH/site:$PYTHONPATH"
        du -sh "$SCRATCH/site"
    else
        echo "spconv: the bundle is for Python 3.12; this is $("$PY" -V 2>&1): not used"
    fi
else
    echo "spconv: no bundle at $BUNDLE (run bench/pack_spconv.sh where the package index is reachable)"
fi

# 2. import spconv.pytorch first, alone: a crash or hang here must not take the other checks with it
step import_spconv 120 "$PY" -c "
import spconv.pytorch, spconv, cumm, torch
print('spconv', spconv.__version__, 'cumm', cumm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    > "$SCRATCH/import_spconv.txt" 2>&1
cat "$SCRATCH/import_spconv.txt"
if "$PY" -c "import json,sys; sys.exit(json.load(open('$JSON'))['steps']['import_spconv'] != '0')"; then
    export PONDER_GPU_SPCONV=1
else
    why=$(grep -E "Error|error|TIMED OUT" "$SCRATCH/import_spconv.txt" | tail -n 1)
    export PONDER_GPU_SPCONV=0 PONDER_GPU_SPCONV_REASON="import spconv.pytorch failed: ${why:-see the log}"
fi

# 3. the checks; the env step runs one sparse conv on the device and leaves spconv_ok when it worked
ARGS=(--json "$JSON" --cache "$SCRATCH" "$@")
step env 90 "$PY" bench/gpu_check.py --step env "${ARGS[@]}"
if [ "$PONDER_GPU_SPCONV" = 1 ] && [ ! -f "$SCRATCH/spconv_ok" ]; then
    export PONDER_GPU_SPCONV=0 PONDER_GPU_SPCONV_REASON="spconv imports but its test conv failed (see env.spconv)"
fi
echo "spconv used: $PONDER_GPU_SPCONV ${PONDER_GPU_SPCONV_REASON:-}"
step parity 120 "$PY" bench/gpu_check.py --step parity "${ARGS[@]}"
step timing 180 "$PY" bench/gpu_check.py --step timing "${ARGS[@]}"
[ -z "${PONDER_SHARED:-}" ] && [ -d .gpu/reference/fixtures ] && export PONDER_SHARED=$PWD/.gpu
step pytest 90 "$PY" -m pytest tests/test_gpu_smoke.py -q -p no:cacheprovider -o addopts="" -rs
echo "done in $((SECONDS - START)) s; figures: $JSON"
sleep 1  # let tee write the log out
