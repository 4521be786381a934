#!/usr/bin/env bash
# On the development machine: kernel libraries for an A/B on the GPU machine (tools/device_bench.sh AB=1).
#
#     bash tools/build_variants.sh [NAME=FLAGS ...]     e.g.  gt2=-DMOETRT_GATE_TOK=2 "r2=-DA=1 -DB=2"
#
# Builds this tree for sm_90 into .devbuild/libmoetrt_kernels.so (the default) and once per NAME=FLAGS with those
# nvcc flags (the MOETRT_* build-time switches), packing the variants as .devbuild/variants.tar.xz (each library is
# ~13 MB and the device tool carries 64 MiB; tools/device_env.sh unpacks them there as .devbuild/lib_NAME.so).
# Build folders stay under $BUILD_ROOT (default /tmp/moetrt_variants), so a rebuild compiles only what changed.
set -euo pipefail
root=${BUILD_ROOT:-/tmp/moetrt_variants}
build() {  # NAME FLAGS
  cmake -S . -B "$root/$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    "-DCMAKE_CUDA_FLAGS=$2" > "$root/$1.log" 2>&1 && cmake --build "$root/$1" >> "$root/$1.log" 2>&1 \
    || { echo "build $1 failed; see $root/$1.log" >&2; exit 1; }
}
for spec in "$@"; do
  case $spec in *=*) ;; *) echo "not NAME=FLAGS: '$spec'" >&2; exit 2 ;; esac
done
mkdir -p "$root"
rm -rf .devbuild "$root/pack" && mkdir -p .devbuild "$root/pack"
echo "building the default library (sm_90)"
build default ""
cp "$root/default/libmoetrt_kernels.so" .devbuild/
for spec in "$@"; do
  name=${spec%%=*} flags=${spec#*=}
  echo "building $name ($flags)"
  build "v_$name" "$flags"
  cp "$root/v_$name/libmoetrt_kernels.so" "$root/pack/lib_$name.so"
done
[ $# -gt 0 ] && tar cf - -C "$root/pack" . | xz -6 -T2 > .devbuild/variants.tar.xz
du -sh .devbuild
