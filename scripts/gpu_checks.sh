#!/bin/bash
# The GPU checks of the speed issue, in order of what is still open, within a time budget,
# on a CUDA machine where the harness's dependencies are importable but `make install` cannot
# run (no network): the commands call `$PY -m harness.cli` from this checkout.
#
#   PY=python3 DEADLINE=540 SUFFIX=-h200 bash scripts/gpu_checks.sh [OUTDIR]
#
# The dependencies can travel as wheels: `make gpu-wheels PRESENT=FILE` here (FILE names the
# packages the device has), then on the device, before this script,
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# (`make gpu-rehearse PRESENT=FILE` rehearses that install on CPU, with the smoke profiles.)
#
# Each step gets what is left of DEADLINE seconds (skipped under 30); after each, the reports
# and runs named *$SUFFIX are packed into OUTDIR/results.tgz, so a run cut short keeps what
# finished. Steps: the packing benchmark at the gpu profile's size, eager and with compiled
# blocks (bf16); the packing study with compiled blocks, then eager; the DiT-B/2 MFU target;
# the speed-paths ablation.
#
# STEPS="bench-eager bench-compiled" (names from ALL_STEPS below; default all) runs only those,
# in the order above: a lease split into several short calls on the warm machine brings each
# call's results back, where one long call that loses its machine brings back nothing (the
# H100 lent on 2026-12-05 stopped answering in such a call; docs/speed.md, "On a GPU").
set -u
export PYTHONUNBUFFERED=1
PY=${PY:-python3}; DEADLINE=${DEADLINE:-540}; SUFFIX=${SUFFIX:--gpu}; OUTDIR=${1:-.}
ALL_STEPS="bench-eager bench-compiled study-packing-compile study-packing study-dit study-paths"
STEPS=${STEPS:-$ALL_STEPS}
has() { case " $1 " in *" $2 "*) return 0;; esac; return 1; }  # LIST WORD: WORD is in LIST
for s in $STEPS; do
  has "$ALL_STEPS" "$s" || { echo "gpu_checks: unknown step '$s' in STEPS; valid: $ALL_STEPS" >&2; exit 2; }
done
[ -n "${STEPS// /}" ] || { echo "gpu_checks: STEPS is empty; valid: $ALL_STEPS" >&2; exit 2; }
[[ "$DEADLINE" =~ ^[0-9]+$ ]] || { echo "gpu_checks: DEADLINE must be whole seconds, got '$DEADLINE'" >&2; exit 2; }
[ -d "$OUTDIR" ] || { echo "gpu_checks: OUTDIR '$OUTDIR' is not a folder" >&2; exit 2; }
wanted() { has "$STEPS" "$1"; }
T0=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
log() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
save() { tar czf "$OUTDIR/results.tgz" reports/*"$SUFFIX"* runs/*"$SUFFIX"* 2>/dev/null; }
budget() { local t; t=$(left); [ "$t" -lt "$1" ] && echo "$t" || echo "$1"; }
bench() {  # name cap extra-args...
  local name=$1 cap; cap=$(budget "$2"); shift 2
  [ "$cap" -lt 30 ] && { log "skip $name: ${cap}s left"; return; }
  log "bench-packing $name (cap ${cap}s)"
  timeout "$cap" "$PY" -m harness.bench_packing --device cuda --bf16 --settle 0 --steps 20 \
    --warmup 5 --depth 12 --batch-size 256 --max-size 128 --max-seq-len 1024 "$@" \
    --out "reports/packing_bench-gpu$SUFFIX-$name/README.md"
  log "bench-packing $name rc=$?"; save
}
study() {  # study profile cap
  local cap; cap=$(budget "$3")
  [ "$cap" -lt 30 ] && { log "skip $1 $2: ${cap}s left"; return; }
  log "study $1 $2 (cap ${cap}s)"
  timeout "$cap" "$PY" -m harness.cli run "studies/$1.yaml" --profile "$2" --runs-dir "runs/$1-$2$SUFFIX" --quiet
  log "study $1 rc=$?"
  timeout 60 "$PY" -m harness.cli report "studies/$1.yaml" --profile "$2" --runs-dir "runs/$1-$2$SUFFIX" \
    --out "reports/$1-$2$SUFFIX"
  save
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
"$PY" -c "import harness, torch, optuna, mlflow, fvcore; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 3
wanted bench-eager && bench eager 90
wanted bench-compiled && bench compiled 150 --compile-blocks
wanted study-packing-compile && study speed_packing gpu-compile 360
wanted study-packing && study speed_packing gpu 300
wanted study-dit && study speed_dit gpu-target 300
wanted study-paths && study speed_paths gpu 600
log done
