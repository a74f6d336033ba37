#!/usr/bin/env bash
# One GPU call: bf16/GPU tests of the named files (one process each), then benchmark commands, everything
# logged and packed into one archive ($OUT/results.tgz: the device returns few files).
#   TESTS="tests/a.py tests/b.py::test_x" BENCH="python benchmarks/zoo.py ...;python ..." bash scripts/gpu_campaign.sh
# A test file entry may carry pytest options after a '|' (e.g. "tests/test_nonfinite.py|-m not slow").
source scripts/gpu_setup.sh
export PYTHONUNBUFFERED=1
DEST=${OUT:-out/gpu}
WORK=$(mktemp -d)
export RESULTS=$WORK
LOG=$WORK/campaign.log
for entry in ${TESTS:-}; do
  f=${entry%%|*}; opts=""; [ "$f" != "$entry" ] && opts=${entry#*|}
  echo "== $f $opts" >> "$LOG"
  timeout ${TEST_TIMEOUT:-90} python -m pytest -q -p no:cacheprovider -x ${opts//,/ } ${f//+/ } 2>&1 \
    | grep -E "passed|failed|error|^FAILED|^ERROR|^E  " | head -n 12 >> "$LOG"
done
IFS=';' read -ra cmds <<< "${BENCH:-}"
for c in "${cmds[@]}"; do
  echo "== $c" >> "$LOG"
  timeout ${BENCH_TIMEOUT:-300} bash -c "$c" >> "$LOG" 2>&1
done
tail -n 150 "$LOG"
mkdir -p "$DEST"
tar czf "$DEST/results.tgz" -C "$WORK" .
