#!/bin/bash
# A rehearsal, on this CPU machine, of how scripts/gpu_checks.sh gets its dependencies on a
# CUDA machine that has torch but no package index: does the set scripts/gpu_wheels.sh
# carries, added to what that machine already has, run the harness?
#
#   bash scripts/gpu_rehearse.sh PRESENT [WORKDIR]
#
# PRESENT is the file gpu_wheels.sh takes (the packages the device has). In WORKDIR (default
# a new temporary folder):
#   1. a fresh venv with this checkout's torch and, at this venv's versions, only the packages
#      of this venv that PRESENT names: what the device would have (from the package index);
#   2. the wheels gpu_wheels.sh would carry, for this machine's Python (the device's are for
#      3.12; PYVER sets it), installed the way the device installs them
#      (pip --no-index --no-deps --target SITE);
#   3. with PYTHONPATH=SITE:checkout, gpu_checks.sh's import line, then on CPU the smoke
#      profiles of the studies gpu_checks.sh runs (speed_packing smoke-compile, speed_dit
#      smoke, speed_paths smoke), each with its report, and bench_packing --compile-blocks at
#      a tiny size.
# Each step prints ok or FAIL with its log; the exit status is the number of failed steps
# (2 for bad input, before anything is built). Needs the package index (step 1 and 2) and a
# C++ compiler (the compiled smoke profiles); takes about 5 minutes on 2 cores.
set -uo pipefail
PRESENT=${1:-}
[ -n "$PRESENT" ] || { echo "usage: bash scripts/gpu_rehearse.sh PRESENT [WORKDIR]" >&2; exit 2; }
[ -r "$PRESENT" ] || { echo "gpu_rehearse: cannot read PRESENT file '$PRESENT'" >&2; exit 2; }
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "gpu_rehearse: no python at '$PY' (run make install, or set PY)" >&2; exit 2; }
source "$(dirname "$0")/present_names.sh"
have=$(present_names "$PRESENT")
[ -n "$have" ] || { echo "gpu_rehearse: '$PRESENT' names no packages" >&2; exit 2; }
WORK=${2:-$(mktemp -d /tmp/gpu_rehearse.XXXXXX)}
mkdir -p "$WORK" || exit 2
PYVER=${PYVER:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
fails=0
step() {  # name command...: run, log to WORK/name.log, print ok / FAIL
  local name=$1; shift
  if "$@" > "$WORK/$name.log" 2>&1; then echo "ok    $name"
  else echo "FAIL  $name (log: $WORK/$name.log)"; tail -5 "$WORK/$name.log" | sed 's/^/      /'
       fails=$((fails + 1)); fi
}

# 1. what the device has: torch, and this venv's versions of the packages PRESENT names
torch_ver=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
venv_pins "$PY" | while IFS='=' read -r n _ ver; do
    listed "$n" "$have" && ! [[ $n =~ ^($DEVICE_OWN)$ ]] && echo "$n==$ver"
  done > "$WORK/device_has.txt"
echo "gpu_rehearse: in $WORK; the device side gets torch==$torch_ver and $(wc -l < "$WORK/device_has.txt") packages PRESENT names"
device_venv() {
  "$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$WORK/venv" && \
  "$WORK/venv/bin/python" -m pip install -q "torch==$torch_ver" 2>&1 | quiet && \
  "$WORK/venv/bin/python" -m pip install -q -r "$WORK/device_has.txt" 2>&1 | quiet && \
  "$WORK/venv/bin/python" -c "import torch"
}
step device-venv device_venv
# 2. the carried wheels, installed as on the device
carry() {
  PY="$PY" PYVER="$PYVER" bash scripts/gpu_wheels.sh "$PRESENT" "$WORK/whl" && \
  "$WORK/venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$WORK/site" "$WORK"/whl/*.whl 2>&1 | quiet
}
step carried-wheels carry
# 3. the harness from the checkout, on those packages alone
export PYTHONPATH="$WORK/site:$PWD"
D="$WORK/venv/bin/python"
step imports "$D" -c "import harness, torch, optuna, mlflow, fvcore; print('torch', torch.__version__)"
for s in speed_packing:smoke-compile speed_dit:smoke speed_paths:smoke; do
  st=${s%%:*}; pr=${s##*:}
  step "$st-$pr" "$D" -m harness.cli run "studies/$st.yaml" --profile "$pr" \
    --runs-dir "$WORK/runs/$st-$pr" --quiet
  step "$st-$pr-report" "$D" -m harness.cli report "studies/$st.yaml" --profile "$pr" \
    --runs-dir "$WORK/runs/$st-$pr" --out "$WORK/reports/$st-$pr"
done
step bench-packing-compiled "$D" -m harness.bench_packing --steps 2 --warmup 1 --depth 2 \
  --compile-blocks --out "$WORK/reports/packing_bench/README.md"
echo "gpu_rehearse: $fails failed"
exit "$fails"
