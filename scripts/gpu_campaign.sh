#!/usr/bin/env bash
# One GPU call: test files in parallel (one process each: an illegal access poisons only its own CUDA
# context; Triton compiles run on the host's cores meanwhile), then benchmark commands one after another
# on the idle GPU. Everything is logged, printed as it finishes, and packed into $OUT/results.tgz.
#   TESTS="tests/a.py tests/b.py|-m,gpu" BENCH="cmd1;cmd2" TEST_TIMEOUT=150 BENCH_TIMEOUT=200 \
#     bash scripts/gpu_campaign.sh
# PYTEST_X= runs every test of a file (default -x stops at the first failure).
# A test entry may carry pytest options after '|', commas for spaces. Nothing runs past DEADLINE seconds.
source scripts/gpu_setup.sh
export PYTHONUNBUFFERED=1
DEST=${OUT:-out/gpu}
WORK=$(mktemp -d)
export RESULTS=$WORK
START=$SECONDS
DEADLINE=${DEADLINE:-540}
i=0
for entry in ${TESTS:-}; do
  f=${entry%%|*}; opts=""; [ "$f" != "$entry" ] && opts=${entry#*|}
  i=$((i + 1))
  ( timeout ${TEST_TIMEOUT:-150} python -m pytest -q -p no:cacheprovider ${PYTEST_X--x} ${opts//,/ } $f > "$WORK/test_$i.log" 2>&1
    echo "== $f ${opts//,/ } (rc $?, $((SECONDS - START)) s): $(grep -E 'passed|failed|error|no tests ran' "$WORK/test_$i.log" | tail -n 1)"
    grep -E "^FAILED|^ERROR|^E  " "$WORK/test_$i.log" | head -n 6 ) &
done
wait
IFS=';' read -ra cmds <<< "${BENCH:-}"
for c in "${cmds[@]}"; do
  left=$((DEADLINE - (SECONDS - START)))
  [ $left -lt 20 ] && { echo "== skipped (deadline): $c"; continue; }
  echo "== $c"
  timeout $(( left < ${BENCH_TIMEOUT:-300} ? left : ${BENCH_TIMEOUT:-300} )) bash -c "$c" 2>&1 | tee -a "$WORK/bench.log" \
    | grep -E "${BENCH_GREP:-.}" | tail -n ${BENCH_LINES:-40}
done
mkdir -p "$DEST"
tar czf "$DEST/results.tgz" -C "$WORK" .
echo "== done in $((SECONDS - START)) s"
