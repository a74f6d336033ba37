#!/usr/bin/env bash
# One GPU call of the quality study (examples/quality_study.py --card h200): first the GPU tests of the pieces
# the study runs on (TESTS; skipped with TESTS=none), then as many jobs as fit in what is left of CALL_S
# seconds, then the report and every finished job's records packed into $OUT/quality_runs.tgz. Finished
# jobs already under runs/quality_study_h200 (brought back by earlier calls and unpacked there) are skipped.
#   CALL_S=560 VARIANTS=dense,msa,dsa JOBS=10 bash scripts/gpu_quality_call.sh
#   (VARIANTS always names dense, the paired baseline; its finished jobs are skipped)
# MPS=1 runs the jobs under an MPS daemon (kernels of several processes then share the GPU at once instead
# of taking turns), if the machine has one and a test process runs under it; the log says which.
# PROFILE=1 times one training step per variant, alone, before the jobs (scripts/profile_study_steps.py).
# KEEP_TRITON_CACHE=1 keeps the Triton cache of the linear variants' pre-warm and jobs (fla's compiled kernels and
# autotuning results) in .triton_cache/, starting from .triton_cache.tgz if the call carried one, and packs it
# into $OUT/triton_cache.tgz (in 15 MB parts, triton_cache.tgz.part-aa, -ab, ..., if larger). Join the parts
# into .triton_cache.tgz in the repository root and carry it: the next fresh machine then neither compiles nor
# autotunes fla's kernels again (that took ~190 s of a call).
# TESTS_BG=1 runs the GPU tests beside the study's jobs (under MPS if it is on) instead of before them. The tests
# share the linear variants' kept cache, where there is one.
# Unpack the archive into the repository root afterwards (tar xzf quality_runs.tgz); runs/ is git-ignored, so
# the device tool's call must carry it (carry: ["runs", ".whl"]) for the next call to skip those jobs.
set -u
source scripts/gpu_setup.sh
export PYTHONUNBUFFERED=1
START=$SECONDS
DEST=${OUT:-out/gpu}
mkdir -p "$DEST"
CACHE_ARGS=() CACHE_ENV=()
if [ "${KEEP_TRITON_CACHE:-0}" = 1 ]; then
  mkdir -p .triton_cache
  [ -f .triton_cache.tgz ] && tar xzf .triton_cache.tgz
  echo "== Triton cache of the linear variants: $(du -sh .triton_cache | cut -f1) carried in"
  CACHE_ARGS=(--linear-triton-cache .triton_cache) CACHE_ENV=(env "TRITON_CACHE_DIR=$PWD/.triton_cache")
fi
if [ "${PROFILE:-0}" = 1 ]; then
  timeout "${PROFILE_S:-120}" python scripts/profile_study_steps.py --variants "${PROFILE_VARIANTS:-dense,msa,dsa,csa,nsa,moba}" \
    --steps 10 --out "$DEST/profile_study_steps_h200.json" 2>&1 | grep -v "Warning\|warn\|USDT\|profiler"
fi
TESTS=${TESTS:-"tests/test_index_kl_gather.py tests/test_quality_study.py"}  # fla autotunes: its tests need a call of their own
run_tests() {
  # shellcheck disable=SC2086
  "${CACHE_ENV[@]}" timeout "${TESTS_S:-240}" python -m pytest -q -p no:cacheprovider -m gpu $TESTS 2>&1 | tail -n 15
}
if [ "$TESTS" != none ] && [ "${TESTS_BG:-0}" != 1 ]; then
  run_tests
fi
MPS_ON=0
if [ "${MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 60 python -c "import torch; assert torch.ones(4, device='cuda').sum().item() == 4"; then
    MPS_ON=1
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi
echo "== MPS asked ${MPS:-0}, on $MPS_ON (control: $(command -v nvidia-cuda-mps-control || echo none))"
if [ "$TESTS" != none ] && [ "${TESTS_BG:-0}" = 1 ]; then
  run_tests > "$DEST/gpu_tests.log" 2>&1 &
  TESTS_PID=$!
fi
LEFT=$(( ${CALL_S:-560} - (SECONDS - START) - 20 ))
echo "== study: $LEFT s"
python examples/quality_study.py --card h200 --jobs "${JOBS:-10}" --time-limit "$LEFT" "${CACHE_ARGS[@]}" \
  ${VARIANTS:+--variants "$VARIANTS"} ${TASKS:+--tasks "$TASKS"} ${SEEDS:+--seeds "$SEEDS"} ${FIRST:+--first "$FIRST"} --results /tmp/study_report 2>&1 | tail -n 80
cp /tmp/study_report/quality_study_h200.md "$DEST/"  # the rest is rebuilt here with --report-only (8 files come back)
if [ -n "${TESTS_PID:-}" ]; then
  wait "$TESTS_PID"
  echo "== GPU tests (beside the study):"
  cat "$DEST/gpu_tests.log"
fi
[ "$MPS_ON" = 1 ] && { echo quit | nvidia-cuda-mps-control; cat /tmp/mps_log/control.log 2>/dev/null | tail -n 5; }
find runs/quality_study_h200 \( -name train.json -o -name train.log -o -name metrics.jsonl -o -name prewarm.log \) \
  | tar czf "$DEST/quality_runs.tgz" -T -
if [ "${KEEP_TRITON_CACHE:-0}" = 1 ]; then
  tar czf /tmp/triton_cache.tgz .triton_cache
  size_mb=$(du -m /tmp/triton_cache.tgz | cut -f1)
  if [ "$size_mb" -le 45 ]; then  # the device brings back 16 MB a file, 64 MB in all
    split -b 15M /tmp/triton_cache.tgz "$DEST/triton_cache.tgz.part-"
    echo "== Triton cache of the linear variants: $(du -sh .triton_cache | cut -f1), packed in ${size_mb} MB"
  else
    echo "== Triton cache of the linear variants: ${size_mb} MB packed, too large to bring back"
  fi
fi
echo "== done in $((SECONDS - START)) s"
