#!/usr/bin/env bash
# On a machine with 2+ GPUs: the 350M-64E preset at tp=1 and tp=2 (per-token latency, throughput, all-reduce
# time per step). Results under $OUT.
source "$(dirname "$0")/device_env.sh"
CK=/tmp/ck350
[ -f $CK/config.json ] || python3 -m moetrt init-checkpoint $CK --preset gpt-moe-350m-64e --format moetrt --dtype fp16 --quiet
for TP in ${TPS:-1 2}; do
  [ -f /tmp/e350tp$TP/engine.json ] || python3 -m moetrt compile $CK -o /tmp/e350tp$TP --dtype fp16 --tp $TP \
      --max-batch 8 --max-seq 640 --quiet --force
  python3 -m moetrt bench /tmp/e350tp$TP --batch ${BATCHES:-1,8} --no-eager --output "$OUT/bench_tp$TP.json" 2>&1 \
    | grep -v "weights on the device" | tee "$OUT/bench_tp$TP.log"
done
