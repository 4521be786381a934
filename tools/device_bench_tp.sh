#!/usr/bin/env bash
# On a machine with 2+ GPUs: a preset at tp = 1, 2, ... (per-token latency, throughput, all-reduce time per step).
# PRESET (default gpt-moe-350m-64e), TPS (default "1 2"), BATCHES (default 1,8). Results under $OUT.
source "$(dirname "$0")/device_env.sh"
PRESET=${PRESET:-gpt-moe-350m-64e}
CK=/tmp/ck-$PRESET
[ -f $CK/config.json ] || /usr/bin/time -f "init-checkpoint: %e s" python3 -m moetrt init-checkpoint $CK \
    --preset $PRESET --format moetrt --dtype fp16 --quiet 2>&1 | tee -a "$OUT/init_$PRESET.log"
for TP in ${TPS:-1 2}; do
  ENG=/tmp/e-$PRESET-tp$TP
  [ -f $ENG/engine.json ] || /usr/bin/time -f "compile tp$TP: %e s" python3 -m moetrt compile $CK -o $ENG \
      --dtype fp16 --tp $TP --max-batch 8 --max-seq 640 --quiet --force 2>&1 | tee -a "$OUT/compile_$PRESET.log"
  python3 -m moetrt bench $ENG --batch ${BATCHES:-1,8} --no-eager --output "$OUT/bench_${PRESET}_tp$TP.json" 2>&1 \
    | grep -v "weights on the device" | tee "$OUT/bench_${PRESET}_tp$TP.log"
done
