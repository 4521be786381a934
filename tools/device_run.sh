#!/usr/bin/env bash
# One call on the GPU machine: environment facts, the whole test suite (GPU tests included), then the kernel
# benchmark; logs under $OUT. Expects the kernel library built on the dev machine in .devbuild/ (carried).
source "$(dirname "$0")/device_env.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv; python3 --version;
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -m pytest -q --maxfail=15 -rs ${TESTS:-tests} -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -30
status=${PIPESTATUS[0]}
if [ "${BENCH:-1}" = 1 ]; then
  python3 -m moetrt bench kernels --output "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench.log"
fi
exit "$status"
