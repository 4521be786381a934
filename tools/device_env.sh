# Sourced by the tools/device_*.sh scripts on the GPU machine: $OUT, the carried kernel library (.devbuild/),
# and the packages the GPU image lacks (onnx-graphsurgeon, polygraphy, nvmath-python, nccl4py), installed once
# from the wheels carried in .whl/ into /tmp/site.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -f .devbuild/variants.tar.xz ]; then  # variant libraries packed by tools/build_variants.sh
  tar xJf .devbuild/variants.tar.xz -C .devbuild && rm .devbuild/variants.tar.xz
fi
export PYTHONUNBUFFERED=1 MOETRT_KERNELS_LIB="$PWD/.devbuild/libmoetrt_kernels.so" PYTHONPATH="$PWD:/tmp/site"
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && touch /tmp/site/.installed
fi
