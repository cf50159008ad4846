#!/bin/bash
# Wheels of the harness's dependencies for a CUDA machine that has torch but cannot reach a
# package index (as scripts/gpu_checks.sh expects them: `pip install --no-index --target`).
#
#   bash scripts/gpu_wheels.sh PRESENT [DIR]
#
# PRESENT names the packages that machine already has (a file; names separated by commas,
# spaces or new lines, as `pip list` or an image's manifest gives them). Every package of
# this checkout's venv ($PY, default .venv/bin/python) that is not in PRESENT is fetched as a
# Linux x86-64 CPython 3.12 wheel into DIR (default .whl, git-ignored); torch and its CUDA
# packages, the PostgreSQL driver and the optional peer are left out, and the three
# dependencies of fvcore that PyPI ships only as source (fvcore, iopath, yacs) are built
# here. It stops with a non-zero exit before fetching anything if PRESENT cannot be read.
# LIST_ONLY=1 names what would be carried and fetches nothing.
set -eo pipefail
PRESENT=${1:-}
[ -n "$PRESENT" ] || { echo "usage: bash scripts/gpu_wheels.sh PRESENT [DIR]  (PRESENT: a file naming the packages the device has)" >&2; exit 2; }
DIR=${2:-.whl}; PY=${PY:-.venv/bin/python}; PYVER=${PYVER:-3.12}
[ -r "$PRESENT" ] || { echo "gpu_wheels: cannot read PRESENT file '$PRESENT'" >&2; exit 2; }
[ -x "$PY" ] || { echo "gpu_wheels: no python at '$PY' (run make install, or set PY)" >&2; exit 2; }
source "$(dirname "$0")/present_names.sh"
have=$(present_names "$PRESENT")
[ -n "$have" ] || { echo "gpu_wheels: '$PRESENT' names no packages" >&2; exit 2; }
SOURCE_ONLY="fvcore iopath yacs"
SKIP="^($DEVICE_OWN|cuda-.*|psycopg.*|vit-pytorch|sora-ablation-harness|pip|setuptools|wheel)$"
need=$(venv_pins "$PY" | while IFS='=' read -r n _ ver; do
         listed "$n" "$have" || [[ $n =~ $SKIP ]] || echo "$n==$ver"; done)
echo "gpu_wheels: $(echo "$need" | grep -c .) packages to carry: $(echo $need)"
[ -n "$need" ] && [ -z "${LIST_ONLY:-}" ] || exit 0
mkdir -p "$DIR"
binary=$(echo "$need" | grep -Ev "^($(echo $SOURCE_ONLY | tr ' ' '|'))==" || true)
source=$(echo "$need" | grep -E "^($(echo $SOURCE_ONLY | tr ' ' '|'))==" || true)
plat=""; for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
  manylinux_2_17 manylinux2014 manylinux1; do plat="$plat --platform ${p}_x86_64"; done
if [ -n "$binary" ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp $plat -d "$DIR" $binary 2>&1 | quiet
fi
# shellcheck disable=SC2086
[ -z "$source" ] || "$PY" -m pip wheel -q --no-deps -w "$DIR" $source 2>&1 | quiet
size=$(du -sm "$DIR" | cut -f1)
echo "gpu_wheels: $(ls "$DIR"/*.whl | wc -l) wheels, ${size} MiB in $DIR (carry: [\"$DIR\"], 64 MiB at most)"
[ "$size" -le 64 ] || { echo "gpu_wheels: $DIR is over 64 MiB" >&2; exit 1; }
