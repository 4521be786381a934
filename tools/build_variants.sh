#!/usr/bin/env bash
# On the development machine: kernel libraries for an A/B on the GPU machine (tools/device_bench.sh AB=1).
#
#     bash tools/build_variants.sh [NAME=FLAGS ...]     e.g.  gt2=-DMOETRT_GATE_TOK=2 "r2=-DA=1 -DB=2" old=@HEAD~1
#
# Builds this tree for sm_90 into .devbuild/libmoetrt_kernels.so (the default) and once per NAME=FLAGS with those
# nvcc flags (the MOETRT_* build-time switches), or per NAME=@REV the tree at git revision REV (say, the one before
# a change, to confirm it on the full model), packing the variants as .devbuild/variants.tar.xz (each library is
# ~13 MB and the device tool carries 64 MiB; tools/device_env.sh unpacks them there as .devbuild/lib_NAME.so).
# Build folders stay under $BUILD_ROOT (default /tmp/moetrt_variants), so a rebuild compiles only what changed.
set -euo pipefail
root=${BUILD_ROOT:-/tmp/moetrt_variants}
build() {  # NAME FLAGS [SOURCE]
  cmake -S "${3:-.}" -B "$root/$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    "-DCMAKE_CUDA_FLAGS=$2" > "$root/$1.log" 2>&1 && cmake --build "$root/$1" >> "$root/$1.log" 2>&1 \
    || { echo "build $1 failed; see $root/$1.log" >&2; exit 1; }
}
for spec in "$@"; do
  case $spec in *=*) ;; *) echo "not NAME=FLAGS or NAME=@REV: '$spec'" >&2; exit 2 ;; esac
  rev=${spec#*=}
  if [[ $rev == @* ]] && ! git rev-parse -q --verify "${rev#@}^{commit}" > /dev/null; then
    echo "not a git revision: '${rev#@}' (in '$spec')" >&2; exit 2
  fi
done
mkdir -p "$root"
rm -rf .devbuild "$root/pack" && mkdir -p .devbuild "$root/pack"
echo "building the default library (sm_90)"
build default ""
cp "$root/default/libmoetrt_kernels.so" .devbuild/
for spec in "$@"; do
  name=${spec%%=*} flags=${spec#*=}
  echo "building $name ($flags)"
  if [[ $flags == @* ]]; then  # the tree at a revision, from a worktree under $root for the build's time
    dir="r_$name" src="$root/src_$name"
    git worktree remove --force "$src" 2>/dev/null || rm -rf "$src"
    git worktree add --quiet --detach -f "$src" "${flags#@}"
    build "$dir" "" "$src"
    git worktree remove --force "$src"
  else
    dir="v_$name"
    build "$dir" "$flags"
  fi
  cp "$root/$dir/libmoetrt_kernels.so" "$root/pack/lib_$name.so"
done
[ $# -gt 0 ] && tar cf - -C "$root/pack" . | xz -6 -T2 > .devbuild/variants.tar.xz
du -sh .devbuild
