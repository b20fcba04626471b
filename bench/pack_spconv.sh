#!/usr/bin/env bash
# Pack what bench/gpu_check.sh needs on an offline GPU host (Python 3.12) into the ignored folder .gpu/:
#   .gpu/spconv/spconv-py312.tar.xz   spconv-cu121 2.3.8 + cumm-cu121 0.7.11 and their small pure-Python needs,
#                                     unzipped into one folder and recompressed (the wheels alone are
#                                     ~101 MB, unzipped 381 MB)
#   .gpu/reference/                   the fixtures the parity checks read (../shared does not travel) and the
#                                     published SpUNet-v1m1 key listing (~21 MB)
# The device tool moves at most 64 MiB per call, working tree (~20 MiB) included, so the two cannot go in
# one call: carry ".gpu/reference" in one (engine, kernel maps, onnxruntime, parity with the fixtures) and
# ".gpu/spconv" in another (spconv CUDA, checked against the engine and timed beside it).
# Run here (it needs the package index), from the repo root: bash bench/pack_spconv.sh [--no-fixtures]
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=.gpu
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SHARED_REF=${PONDER_SHARED:-../shared}/reference
WITH_FIXTURES=1
[ "${1:-}" = "--no-fixtures" ] && WITH_FIXTURES=0

# pinned: spconv-cu121 2.3.8 requires cumm-cu121>=0.7.11,<0.8 (its METADATA); both are built for cp312 and
# CUDA 12.1 (cumm ships its own CUDA runtime and NVRTC, which the 580 driver runs); and the pure-Python
# packages spconv/cumm/pccm/ccimport import that the GPU image lacks (it has numpy, pybind11, ninja,
# requests, portalocker, sympy).
WHEELS=(spconv-cu121==2.3.8 cumm-cu121==0.7.11 pccm==0.4.16 ccimport==0.4.4 fire==0.7.1 termcolor==3.3.0 lark==1.3.1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT/spconv" "$work/wheels" "$work/site"

# PIP_CONSTRAINT empty: a machine-wide constraints file must not veto these pins
PIP_CONSTRAINT= "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$work/wheels" "${WHEELS[@]}"
ls -l "$work/wheels"

for whl in "$work"/wheels/*.whl; do
    "$PY" -m zipfile -e "$whl" "$work/site"
done
find "$work/site" -name '__pycache__' -prune -exec rm -rf {} +

tar -C "$work/site" -cf - . | xz -T0 -9 > "$OUT/spconv/spconv-py312.tar.xz"
mkdir -p "$OUT/spconv/keys"  # the timing's published-size weights, for the call that carries only .gpu/spconv
cp "$SHARED_REF/keys/semseg-spunet-v1m1-0-base.tsv" "$OUT/spconv/keys/"

if [ "$WITH_FIXTURES" = 1 ]; then
    if [ -d "$SHARED_REF/fixtures" ]; then
        rm -rf "$OUT/reference"
        mkdir -p "$OUT/reference/fixtures" "$OUT/reference/keys"
        cp -r "$SHARED_REF/fixtures/spunet_v1m1_seg" "$SHARED_REF/fixtures/ppt_v1m3_seg" "$OUT/reference/fixtures/"
        cp "$SHARED_REF/keys/semseg-spunet-v1m1-0-base.tsv" "$OUT/reference/keys/"
        rm -f "$OUT"/reference/fixtures/*/README.md
        chmod -R u+w "$OUT/reference"
    else
        echo "no fixtures at $SHARED_REF/fixtures: parity will be skipped on the GPU host" >&2
    fi
fi

# what travels besides a carried folder: tracked and untracked-not-ignored files
tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | tr '\n' '\0' \
        | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
for part in spconv reference; do
    [ -d "$OUT/$part" ] || continue
    size=$(du -sb "$OUT/$part" | cut -f1)
    sum=$((size + tree))
    verdict=ok; [ "$sum" -ge $((64 * 1048576)) ] && verdict="OVER the 64 MiB limit"
    echo "$OUT/$part: $((size / 1048576)) MiB ($size bytes); with the working tree ($((tree / 1048576)) MiB):" \
         "$((sum / 1048576)) MiB, $verdict"
done
