#!/usr/bin/env bash
# On the GPU machine: the 350M-64E preset end to end (synthetic checkpoint, compile, bench against PyTorch and
# the floor). Logs and results under $OUT. With AB=1, instead of profile and bench: tools/engine_ab.py on the
# engine, the default library (.devbuild/libmoetrt_kernels.so) against every other .devbuild/*.so (variant
# builds), BATCHES and ROUNDS (default 2) as given, and the engine_ab.py setting in AB_SETTING if set (say
# "PY:from moetrt.engines.cuda_backend import CudaEngine as C; C.fold_layernorm = False"); TESTK=EXPR then runs the
# kernel tests matching EXPR on each variant. LAYERS=N: the preset's first N layers only (a quicker checkpoint and
# compile for A/Bs; its figures are not the 350M model's).
source "$(dirname "$0")/device_env.sh"
CK=/tmp/ck350${LAYERS:+_$LAYERS} ENG=/tmp/e350${LAYERS:+_$LAYERS}
{ [ -f $CK/config.json ] || /usr/bin/time -v python3 -m moetrt init-checkpoint $CK --preset gpt-moe-350m-64e --format moetrt --dtype fp16 --quiet ${LAYERS:+--layers $LAYERS}; } 2>&1 | grep -E "error|Elapsed|Maximum resident" | tee "$OUT/init350.log"
{ [ -f $ENG/engine.json ] || /usr/bin/time -v python3 -m moetrt compile $CK -o $ENG --dtype fp16 --max-batch ${MAXB:-32} --max-seq 512 --force; } 2>&1 | grep -vE "^\s+(Average|Exit|File|Involuntary|Major|Minor|Page|Percent|Signals|Socket|Swaps|System|User|Voluntary|Command)" | tee "$OUT/compile350.log"
if [ "${AB:-0}" = 1 ]; then
  settings=("-")
  for f in .devbuild/*.so; do [ "${f##*/}" = libmoetrt_kernels.so ] || settings+=("MOETRT_KERNELS_LIB=$PWD/$f"); done
  [ -n "${AB_SETTING:-}" ] && settings+=("$AB_SETTING")
  python3 tools/engine_ab.py $ENG --batch ${BATCHES:-1,8,32} --rounds ${ROUNDS:-2} "${settings[@]}" 2>&1 | tee "$OUT/ab.log"
  if [ -n "${TESTK:-}" ]; then  # the kernel tests matching TESTK on every variant, so that no winner lands untested
    for f in .devbuild/*.so; do
      [ "${f##*/}" = libmoetrt_kernels.so ] && continue
      echo "== ${f##*/}: tests/plugins/test_kernels.py -k '$TESTK'"
      MOETRT_KERNELS_LIB=$PWD/$f python3 -m pytest -q -p no:cacheprovider tests/plugins/test_kernels.py -k "$TESTK" 2>&1 | tail -2
    done | tee "$OUT/ab_tests.log"
  fi
  exit
fi
[ "${PROFILE:-1}" = 1 ] && timeout 120 python3 tools/profile_engine.py $ENG 1,1 8,1 32,1 1,512 2>&1 | grep -v -i warn | tee "$OUT/profile350.log"
python3 -m moetrt bench $ENG --batch ${BATCHES:-1,8,32} --input-len 128 --output-len 32 \
  --output "$OUT/bench_engine_350m.json" --plot "$OUT/bench_engine_350m.png" 2>&1 | tee "$OUT/bench350.log"
