#!/bin/bash
# device run: the GPU targets of issue 8 on the lent H200 (not part of the repo)
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s); DEADLINE=${DEADLINE:-540}
el(){ echo $(( $(date +%s) - T0 )); }
left(){ echo $(( DEADLINE - $(el) )); }
log(){ echo "[t=$(el)s] $*"; }
save(){ tar czf $OUT/results.tgz reports/*-h200* runs/*-h200* 2>/dev/null; log "saved $(du -h $OUT/results.tgz | cut -f1)"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD
log "installed"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv
python3 -c "import torch, harness, optuna, mlflow, fvcore, sqlalchemy; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), 'optuna', optuna.__version__, 'mlflow', mlflow.__version__)" || exit 3
nproc; grep -m1 "model name" /proc/cpuinfo
H="python3 -m harness.cli"
study(){ # name profile cap
  local s=$1 p=$2 cap=$3 t
  t=$(left); [ $t -lt $cap ] && cap=$t
  [ $cap -lt 20 ] && { log "skip $s $p: ${cap}s left"; return; }
  log "run $s $p (cap ${cap}s)"
  timeout $cap $H run studies/$s.yaml --profile $p --runs-dir runs/$s-$p-h200 --quiet; log "run $s rc=$?"
  timeout 60 $H report studies/$s.yaml --profile $p --runs-dir runs/$s-$p-h200 --out reports/$s-$p-h200; log "report $s rc=$?"
  save
}
study speed_dit gpu-target 280
study speed_packing gpu 400
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv
t=$(left); if [ $t -gt 60 ]; then
  log "bench-packing cuda"
  timeout $((t-15)) python3 -m harness.bench_packing --device cuda --steps 30 --warmup 10 --depth 12 --batch-size 256 --max-size 128 --max-seq-len 1024 --out reports/packing_bench-gpu-h200/README.md; log "bench-packing rc=$?"
  save
fi
log done
