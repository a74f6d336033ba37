#!/usr/bin/env bash
# One GPU call: the whole test suite natively on the GPU, then the main job with the GPU config.
# Usage on the device machine:  bash scripts/gpu_verify.sh   (logs and results under $OUT)
source scripts/gpu_setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu_verify}
mkdir -p "$OUT"
timeout ${TEST_TIMEOUT:-330} python -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | grep -v "DEBUG" > "$OUT/pytest_gpu.log"
tail -n 25 "$OUT/pytest_gpu.log"
timeout ${COMPARE_TIMEOUT:-150} python -m sparsezoo.compare --config configs/compare_gpu.yaml --out "$OUT/compare" 2>&1 | grep -v "DEBUG\|Visualization saved" | tail -n 15
cp "$OUT"/compare/compare.md "$OUT"/compare/compare.json "$OUT"/compare/compare.png "$OUT"/compare/patterns.png "$OUT"/ 2>/dev/null
rm -rf "$OUT/compare"
