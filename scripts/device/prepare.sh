#!/usr/bin/env bash
# Run HERE (no GPU needed), once: download what the lent GPU machine lacks (its image has torch
# 2.11+cu130, numpy, numba, matplotlib, tensorboard, pytest; not DALI, DeepSpeed, WebDataset, PyAV)
# into .whl/ (in .gitignore), and cut it into call-sized folders .whl/c1, .whl/c2, ... of at most
# 60 MiB each (a device call carries 64 MiB): DALI's wheel alone is ~250 MB.
#
#   bash scripts/device/prepare.sh
#   then one device call per folder, on one warm machine, the last one running the checks:
#     run(carry=[".whl/c1"], command="bash scripts/device/gpu_check.sh --stage")   # c1 .. c(N-1)
#     run(carry=[".whl/cN"], command="bash scripts/device/gpu_check.sh")            # stage cN, install, run
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl/all
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
# the versions this project is tested with here; their pure or binary dependencies the image lacks
pkgs=("nvidia-dali-cuda130==$(ver nvidia-dali-cuda130)" nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 astunparse gast
      libcst makefun nvtx optree "webdataset==$(ver webdataset)" braceexpand "av==$(ver av)" hjson
      "pydantic==$(ver pydantic)" "pydantic_core==$(ver pydantic_core)" annotated-types typing-inspection)
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl/all "${pkgs[@]}"
# DeepSpeed ships as a source archive only: pure Python once its ops are not prebuilt (DS_BUILD_OPS=0)
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl/all "deepspeed==$(ver deepspeed)"
# cut every file into 50 MiB parts, then deal the parts into folders of at most 60 MiB
mkdir -p .whl/parts
for f in .whl/all/*; do split -b 50M -d -a 2 "$f" ".whl/parts/$(basename "$f").part"; done
i=1; size=0; mkdir -p .whl/c1
for p in $(ls -S .whl/parts); do
  s=$(stat -c %s ".whl/parts/$p")
  if (( size + s > 60 * 1024 * 1024 )); then i=$((i + 1)); size=0; mkdir -p ".whl/c$i"; fi
  mv ".whl/parts/$p" ".whl/c$i/"; size=$((size + s))
done
rm -rf .whl/parts .whl/all
du -sh .whl/c* && echo "$i device calls: carry .whl/c1 .. .whl/c$i (the last runs gpu_check.sh)"
