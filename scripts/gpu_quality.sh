#!/usr/bin/env bash
# The GPU quality comparison (issue 4), in calls of under 10 minutes: each call trains the variants in
# $VARIANTS (default: all) and reuses those an earlier call finished there (--reuse).
# Usage on the device machine:  VARIANTS=dense,msa,nsa,moba bash scripts/gpu_quality.sh; bash scripts/gpu_quality.sh
# TRAIN_LEN (default 2048) and BATCH (default 4) set the final training shape; the curriculum's first
# 1000 steps run at 512 tokens with the same tokens per step. EXTRA adds arguments (e.g. "--set msa.topk=16")
# and TAG names such a run. Runs go to out/quality_gpu_$TRAIN_LEN[_$TAG].
# Results: $OUT/quality.{md,json,png} and $OUT/<run folder>.tgz (specs, results, logs and loss curves;
# unpack it into out/ to continue from another machine).
source scripts/gpu_setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu_quality}
mkdir -p "$OUT"
RUNS=quality_gpu_${TRAIN_LEN:-2048}${TAG:+_$TAG}
python examples/compare_quality.py --out out/$RUNS --variants "${VARIANTS:-all}" \
  --steps 1400 --batch ${BATCH:-4} --train-len ${TRAIN_LEN:-2048} --curriculum 512:1000 \
  --eval-lens 2048,8192,16384 --eval-samples 32 --eval-batch 8 --kv-len 8192 \
  --mix needle=2,recall=1,text=1 --passkey-len 1 --n-pairs 4 --lr 3e-3 \
  --jobs 4 --time-limit 400 --worker-timeout 500 --decode-prompt 8192 --decode-tokens 16 \
  --speed-timeout 60 --deadline 520 --reuse ${EXTRA:-} 2>&1 | grep -v DEBUG | tail -n 40
cp out/$RUNS/quality.* "$OUT"/ 2>/dev/null
tar czf "$OUT/$RUNS.tgz" --exclude=checkpoint -C out $RUNS
