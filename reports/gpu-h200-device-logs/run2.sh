#!/bin/bash
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD
timeout 85 python3 -m harness.bench_packing --device cuda --bf16 --paths --steps 20 --warmup 5 --settle 0 --depth 12 --batch-size 256 --max-size 128 --max-seq-len 1024 --out reports/packing_bench-gpu-h200-paths/README.md 2>&1 | tee $OUT/paths.txt
tar czf $OUT/paths.tgz reports/packing_bench-gpu-h200-paths 2>/dev/null
timeout 75 python3 .whl/diag.py cuda 256 2>&1 | tee $OUT/diag.txt
echo done
