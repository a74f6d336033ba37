#!/usr/bin/env bash
# The zoo issue's GPU campaign in two calls (each under the device's 10-minute limit). Results under $OUT.
#   PART=1 bash scripts/gpu_zoo.sh   bf16 GPU tests of every fast path (one process per file), then
#                                    benchmarks/zoo.py prefill (32k, 128k) and decode (b 1, 8, 32)
#   PART=2 bash scripts/gpu_zoo.sh   zoo forward + backward at 128k (and at 32k for the variants in TRAIN_32K),
#                                    the peers (one process each), the GPU main job
# Carried (ignored by git): .whl/ with the attn-gym and fla-core wheels (scripts/gpu_setup.sh installs them).
# Merge the two runs' JSON with `python benchmarks/zoo.py --render A.json B.json --out examples/results`.
source scripts/gpu_setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu_zoo}
mkdir -p "$OUT"
ZOO="python benchmarks/zoo.py --configs ${CONFIGS:-equal_budget} --no-peers"
if [ "${PART:-1}" = 1 ]; then
  for f in tests/test_fast_paths.py tests/test_moba_kernel.py tests/test_moba_tiles.py tests/test_gather_kernel.py \
      tests/test_prefill_kernels.py tests/test_indexer_kernel.py tests/test_indexer_decode_kernel.py \
      tests/test_nsa_select_kernel.py tests/test_compressed_lse.py "tests/test_msa_ops.py -k fp32"; do
    # one process per file: an illegal access poisons the CUDA context for every later test
    echo "== $f" >> "$OUT/pytest_gpu_zoo.log"
    timeout ${TEST_TIMEOUT:-60} python -m pytest -q -p no:cacheprovider -m gpu $f 2>&1 \
      | grep -E "passed|failed|^FAILED|^E  " | head -n 8 >> "$OUT/pytest_gpu_zoo.log"
  done
  cat "$OUT/pytest_gpu_zoo.log"
  timeout ${ZOO_TIMEOUT:-330} $ZOO --modes prefill,decode --reps 3 --out "$OUT/a" 2>&1 \
    | tee "$OUT/zoo_a.log" | grep -E "^  [a-z]+ |FAILED"
else
  timeout ${TRAIN_TIMEOUT:-270} $ZOO --modes fwd+bwd --train-lengths ${TRAIN_LENGTHS:-131072} --reps 3 \
    --out "$OUT/b" 2>&1 | tee "$OUT/zoo_b.log" | grep -E "^  [a-z]+ |FAILED"
  [ -n "${TRAIN_32K:-}" ] && timeout 120 $ZOO --variants "$TRAIN_32K" --modes fwd+bwd --train-lengths 32768 --reps 3 \
    --out "$OUT/b32" 2>&1 | tee -a "$OUT/zoo_b.log" | grep -E "^  [a-z]+ |FAILED"
  for peer in "lightning_indexer[dsa]" "lightning_indexer[csa]" gather_attn parallel_nsa; do
    timeout 60 python benchmarks/zoo.py --peers-only --peer "$peer" --lengths 131072 --peer-timeout 45 --reps 3 \
      --out "$OUT/p_${peer//[^a-z]/_}" 2>&1 | grep "peer "
  done
  timeout 80 python -m sparsezoo.compare --config configs/compare_gpu.yaml --out "$OUT/c" 2>&1 \
    | grep -v "DEBUG\|Visualization saved" | tail -n 12
  cp "$OUT"/c/compare.md "$OUT"/c/compare.json "$OUT"/ 2>/dev/null
  rm -rf "$OUT/c"
fi
