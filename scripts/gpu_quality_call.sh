#!/usr/bin/env bash
# One GPU call of the quality study (examples/quality_study.py --card h200): first the GPU tests of the pieces
# the study runs on (TESTS; skipped with TESTS=none), then as many jobs as fit in what is left of CALL_S
# seconds, then the report and every finished job's records packed into $OUT/quality_runs.tgz. Finished
# jobs already under runs/quality_study_h200 (brought back by earlier calls and unpacked there) are skipped.
#   CALL_S=560 VARIANTS=dense,msa,dsa JOBS=10 bash scripts/gpu_quality_call.sh
#   (VARIANTS always names dense, the paired baseline; its finished jobs are skipped)
# Unpack the archive into the repository root afterwards (tar xzf quality_runs.tgz); runs/ is git-ignored, so
# the device tool's call must carry it (carry: ["runs", ".whl"]) for the next call to skip those jobs.
set -u
source scripts/gpu_setup.sh
export PYTHONUNBUFFERED=1
START=$SECONDS
DEST=${OUT:-out/gpu}
mkdir -p "$DEST"
TESTS=${TESTS:-"tests/test_index_kl_gather.py tests/test_quality_study.py"}  # fla autotunes: its tests need a call of their own
if [ "$TESTS" != none ]; then
  # shellcheck disable=SC2086
  timeout 240 python -m pytest -q -p no:cacheprovider -m gpu $TESTS 2>&1 | tail -n 15
fi
LEFT=$(( ${CALL_S:-560} - (SECONDS - START) - 20 ))
echo "== study: $LEFT s"
python examples/quality_study.py --card h200 --jobs "${JOBS:-10}" --time-limit "$LEFT" \
  ${VARIANTS:+--variants "$VARIANTS"} ${TASKS:+--tasks "$TASKS"} --results "$DEST" 2>&1 | tail -n 60
find runs/quality_study_h200 \( -name train.json -o -name train.log -o -name metrics.jsonl \) \
  | tar czf "$DEST/quality_runs.tgz" -T -
echo "== done in $((SECONDS - START)) s"
