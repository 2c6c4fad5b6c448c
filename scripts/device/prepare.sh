#!/usr/bin/env bash
# Run HERE (no GPU needed), once: build what the lent GPU machine lacks (its image has torch
# 2.11+cu130, numpy, numba, matplotlib, tensorboard, pytest; not DALI, DeepSpeed, WebDataset, PyAV)
# as installed trees, packed into call-sized folders under .whl/ (a device call carries 64 MiB in
# all; our repo is ~1 MiB of it).
#
# Why trees and not the wheels: the wheels are ~290 MB (DALI alone 199 MB: 4 calls, plus 3 for the
# rest). Unzipped, with the binaries of other Python versions and the symbol tables dropped
# (`strip --strip-unneeded` keeps the dynamic symbols; tests/test_reader.py passed on a stripped
# DALI), and packed with xz -9, they are ~155 MiB. nvcomp is left out (DALI opens it only for its
# decompression operators); nvjpeg is put in (nvImageCodec's GPU JPEG decoder needs it).
#
# Two trees, so that the step's measurements need no staging call: .whl/c1 holds the "core" tree
# (DeepSpeed, WebDataset, PyAV, pydantic: everything the training step and its GPU tests import,
# 22 MiB packed) and the first part of DALI's (131 MiB packed, 3 parts); it runs with the first
# call. gpu_check.sh unpacks DALI once all of its parts have arrived (their names say how many).
#
#   bash scripts/device/prepare.sh        # ~6 min on 2 cores, mostly xz (after the README's install)
#   then, on one warm machine (it goes back after 30 s idle), back to back: the calls at the top of
#   scripts/device/gpu_check.sh (staging .whl/c2 and .whl/c3 first, then .whl/c1 with the step).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
rm -rf .whl && mkdir -p .whl "$work/whl" "$work/site"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
# the versions this project is tested with here; their pure or binary dependencies the image lacks
pkgs=("nvidia-dali-cuda130==$(ver nvidia-dali-cuda130)" "nvidia-nvimgcodec-cu13==$(ver nvidia-nvimgcodec-cu13)"
      "nvidia-nvjpeg==$(ver nvidia-nvjpeg)" astunparse gast libcst makefun nvtx optree
      "webdataset==$(ver webdataset)" braceexpand "av==$(ver av)" hjson
      "pydantic==$(ver pydantic)" "pydantic_core==$(ver pydantic_core)" annotated-types typing-inspection)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$work/whl" "${pkgs[@]}"
# DeepSpeed ships as a source archive only: built here into a pure-Python wheel (no prebuilt ops)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$work" "deepspeed==$(ver deepspeed)"
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/whl" "$work"/deepspeed-*.tar.gz
for w in "$work"/whl/*.whl; do unzip -q -o "$w" -d "$work/site"; done
cd "$work/site"
rm -rf nvidia/dali/include ./*.data
find . -name "*.cpython-3*" ! -name "*.cpython-312-*" -delete
find . -name "*.so*" -type f | while read -r f; do
  file "$f" | grep -q "not stripped" && strip --strip-unneeded "$f" || true
done
# DALI and what only DALI imports; everything else is the core tree
dali=(nvidia nvidia_* nvtx nvtx-* libcst libcst-* gast gast-* astunparse astunparse-* makefun makefun-*
      optree optree-*)
shopt -s nullglob
mkdir -p "$work/dali"
for d in "${dali[@]}"; do for f in $d; do mv "$f" "$work/dali/"; done; done
cd - >/dev/null
[[ -d "$work/dali/nvidia/dali" && -d "$work/site/deepspeed" ]] || { echo "prepare: a tree is missing a package"; exit 1; }
tar -C "$work/site" -cf - . | xz -T2 -9 > "$work/core.tar.xz"
tar -C "$work/dali" -cf - . | xz -T2 -9 > "$work/dali.tar.xz"
# 60 MiB a call leaves room for the repository (1.4 MiB on 2026-11-28; tests/test_device_scripts.py
# checks what is left) in the call's 64 MiB. The core tree goes with the first call, and DALI's
# first part fills what it leaves there.
mib=$((1024 * 1024)); core=$(stat -c %s "$work/core.tar.xz")
(( core < 58 * mib )) || { echo "prepare: the core tree outgrew one call"; exit 1; }
mkdir -p .whl/c1 && mv "$work/core.tar.xz" .whl/c1/
head -c $((60 * mib - core)) "$work/dali.tar.xz" > "$work/dali.tar.xz.part00"
tail -c +$((60 * mib - core + 1)) "$work/dali.tar.xz" | split -b 60M -d -a 2 --numeric-suffixes=1 - "$work/dali.tar.xz.part"
parts=("$work"/dali.tar.xz.part*); n=${#parts[@]}
i=0; for p in "${parts[@]}"; do i=$((i + 1)); mkdir -p ".whl/c$i"; mv "$p" ".whl/c$i/$(basename "$p")-of-$(printf %02d "$n")"; done
[[ $(cat .whl/c*/dali.tar.xz.part* | cmp - "$work/dali.tar.xz" && echo same) == same ]] || { echo "prepare: the parts do not add up"; exit 1; }
tree=$(git ls-files -co --exclude-standard | while read -r f; do [[ -f $f ]] && stat -c %s "$f"; done |
  awk '{s += $1} END {print s + 0}')
for c in .whl/c*; do  # what each call carries, beside the working tree that travels with every call
  (( $(cat "$c"/* | wc -c) + tree <= 63 * mib )) || { echo "prepare: $c and the repository exceed 63 MiB"; exit 1; }
done
du -sh .whl/c* && echo "$i device calls: .whl/c1 (core and DALI's first part) with the step stages, then .whl/c2 .. .whl/c$i"
