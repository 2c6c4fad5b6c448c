#!/usr/bin/env bash
# Run HERE (no GPU needed), once: build what the lent GPU machine lacks (its image has torch
# 2.11+cu130, numpy, numba, matplotlib, tensorboard, pytest; not DALI, DeepSpeed, WebDataset, PyAV)
# as one installed tree, and cut it into call-sized parts .whl/c1, .whl/c2, ... (a device call
# carries 64 MiB in all; our repo is ~1 MiB of it).
#
# Why a tree and not the wheels: the wheels are ~290 MB (DALI alone 199 MB: 4 calls, plus 3 for the
# rest). Unzipped, with the binaries of other Python versions and the symbol tables dropped
# (`strip --strip-unneeded` keeps the dynamic symbols; tests/test_reader.py passed on a stripped
# DALI), and packed with xz -9, it is ~155 MiB: 3 calls. nvcomp is left out (DALI opens it only for
# its decompression operators); nvjpeg is put in (nvImageCodec's GPU JPEG decoder needs it).
#
#   bash scripts/device/prepare.sh        # ~6 min on 2 cores, mostly xz
#   then one device call per folder, on one warm machine (it goes back after 30 s idle):
#     run(carry=[".whl/c1"], command="bash scripts/device/gpu_check.sh --stage")   # c1 .. c(N-1)
#     run(carry=[".whl/cN"], command="bash scripts/device/gpu_check.sh")            # stage cN, install, run
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
tar -cf - . | xz -T2 -9 > "$work/bundle.tar.xz"
cd - >/dev/null
split -b 62M -d -a 2 "$work/bundle.tar.xz" "$work/bundle.tar.xz.part"
i=0; for p in "$work"/bundle.tar.xz.part*; do i=$((i + 1)); mkdir -p ".whl/c$i"; mv "$p" ".whl/c$i/"; done
du -sh .whl/c* && echo "$i device calls: carry .whl/c1 .. .whl/c$i (the last runs gpu_check.sh)"
