#!/usr/bin/env bash
# Several scripts/quality_probe.py runs at once on one GPU: which recipe makes dense learn the study's tasks at
# 8k, and what a training step of every variant costs. One probe per line of PROBES_FILE (its options), each writing
# <out>/<name>.json and <name>.log, all stopping by TIME_LIMIT seconds (their evaluations so far are kept).
#   PROBES_FILE=scripts/probes/h200_long8k.txt OUT_DIR=out/probes TIME_LIMIT=240 bash scripts/quality_probe_campaign.sh
# A line of PROBES_FILE: NAME OPTIONS...  e.g.  dense_mqar --variant dense --task mqar --curriculum 128:400,512:200
# OUT_DIR must be new or empty, so a report never mixes in an earlier call's probes. Lines starting with # are skipped.
set -u
OUT_DIR=${OUT_DIR:-out/probes}
if [ -n "$(ls -A "$OUT_DIR" 2>/dev/null)" ]; then
  echo "OUT_DIR $OUT_DIR is not empty: give a new folder" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
while read -r name opts; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  # shellcheck disable=SC2086
  python scripts/quality_probe.py $opts --time-limit "${TIME_LIMIT:-240}" --out "$OUT_DIR/$name.json" \
    > "$OUT_DIR/$name.log" 2>&1 &
done < "${PROBES_FILE:?a file of probe lines}"
wait
for f in "$OUT_DIR"/*.log; do
  echo "== $(basename "$f" .log)"
  grep -E "^eval|time limit|Error|error" "$f" | tail -n 6
done
