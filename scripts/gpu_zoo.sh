#!/usr/bin/env bash
# One GPU call for the zoo issue: GPU tests of the fast paths, then benchmarks/zoo.py (and the MSA peer).
# Usage on the device machine:  PART=1 bash scripts/gpu_zoo.sh   (results under $OUT)
#   PART=1: bf16 kernel tests + zoo prefill and decode;  PART=2: re-checks, zoo fwd+bwd, peers, main job.
# Carried (ignored by git): .whl/ with the attn-gym and fla-core wheels for the peers (scripts/gpu_setup.sh
# installs them), and .peers/ with the SGLang MSA peer harness, if you time it beside the zoo.
source scripts/gpu_setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu_zoo}
mkdir -p "$OUT"
if [ "${PART:-1}" = 1 ]; then
  for f in ${TESTS:-tests/test_fast_paths.py tests/test_gather_kernel.py tests/test_indexer_kernel.py \
      tests/test_nsa_select_kernel.py tests/test_moba_kernel.py tests/test_prefill_kernels.py}; do
    # one process per file: an illegal access poisons the CUDA context for every later test
    echo "== $f" >> "$OUT/pytest_gpu_zoo.log"
    timeout ${TEST_TIMEOUT:-60} python -m pytest -q -x -p no:cacheprovider -m gpu "$f" 2>&1 \
      | grep -v "^  warnings.warn\|DeprecationWarning" | tail -n 30 >> "$OUT/pytest_gpu_zoo.log"
  done
  grep -E "^== |passed|failed|^E " "$OUT/pytest_gpu_zoo.log" | head -n 40
  [ -n "${TUNE:-}" ] && timeout 150 python benchmarks/zoo.py --tune --lengths 131072 2>&1 | grep "^tune" | tee "$OUT/tune.log"
  timeout ${ZOO_TIMEOUT:-330} python benchmarks/zoo.py --modes prefill,decode --no-peers --out "$OUT" ${ZOO_ARGS:-} 2>&1 \
    | tee "$OUT/zoo_part1.log" | grep -v "^ *$" | tail -n 60
else
  for f in tests/test_fast_paths.py tests/test_nsa_select_kernel.py tests/test_gather_kernel.py; do
    echo "== $f"; timeout 50 python -m pytest -q -x -p no:cacheprovider -m gpu "$f" 2>&1 | grep -E "passed|failed|^E " | head -n 6
  done > "$OUT/pytest_gpu_zoo2.log"; cat "$OUT/pytest_gpu_zoo2.log"
  # decode/prefill re-run of the variants whose kernels changed, training, peers; one results folder each
  timeout 90 python benchmarks/zoo.py --variants ${REDO:-dsa,csa} --modes prefill,decode --no-peers --reps 3 \
    --out "$OUT/a" > "$OUT/a.log" 2>&1; grep -E "^  [a-z]+ " "$OUT/a.log" | cut -c1-200
  timeout 240 python benchmarks/zoo.py --modes fwd+bwd --configs equal_budget --no-peers --reps 3 --out "$OUT/b" \
    > "$OUT/b.log" 2>&1; grep -E "^  [a-z]+ " "$OUT/b.log" | cut -c1-200
  timeout 90 python benchmarks/zoo.py --peers-only --lengths 131072 --peer-timeout 40 --reps 3 --out "$OUT/p" 2>&1 \
    | grep "peer"
  timeout 80 python -m sparsezoo.compare --config configs/compare_gpu.yaml --out "$OUT/c" 2>&1 \
    | grep -v "DEBUG\|Visualization saved" | tail -n 12
  cp "$OUT"/c/compare.md "$OUT"/c/compare.json "$OUT"/ 2>/dev/null
  cat "$OUT"/a.log "$OUT"/b.log > "$OUT/zoo_part2.log"
  rm -rf "$OUT/c" "$OUT"/a.log "$OUT"/b.log "$OUT"/*/zoo_*.md "$OUT"/*/zoo_*.png
fi
