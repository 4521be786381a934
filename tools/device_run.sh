#!/usr/bin/env bash
# One call on the GPU machine: environment facts, the whole test suite (GPU tests included), logs to $OUT.
# Expects the kernel library built on the dev machine and carried in .devbuild/ (see docs/architecture.md).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOETRT_KERNELS_LIB="$PWD/.devbuild/libmoetrt_kernels.so" PYTHONPATH="$PWD"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 --version;
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 -m pytest -q -rs tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
exit "${PIPESTATUS[0]}"
