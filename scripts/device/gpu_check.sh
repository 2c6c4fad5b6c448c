#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE (see prepare.sh). With --stage: copy this call's parts under /tmp
# (they stay while the machine is warm) and stop. Without: stage, assemble and unpack the tree into
# /tmp/site, then run the benchmarks and the GPU tests, each under its own time limit, writing every
# table under $OUT. Most important first: a call cut short still returns what it measured.
# Stage names as arguments run only those: their limits add up to ~17 minutes, more than one call
# may run and more than a session's device time once the machine's start and the two staging calls
# are counted. So, most important first, in calls to the warm machine:
#   bash scripts/device/gpu_check.sh step_T80 step_T240 gpu_tests               (<= 8.5 min: the step)
#   bash scripts/device/gpu_check.sh data e2e_jpeg e2e_jpeg_hybrid augment      (<= 3.5 min: the data)
#   bash scripts/device/gpu_check.sh step_T80_graphs e2e_jpeg_pyav              (if time is left)
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /tmp/carl_parts
cp .whl/c*/* /tmp/carl_parts/ 2>/dev/null
echo "staged: $(ls /tmp/carl_parts | tr '\n' ' ')"
[[ "${1:-}" == "--stage" ]] && exit 0
wanted=" $* "  # empty: every stage
out=${OUT:-/tmp/carl_out}; mkdir -p "$out"
t0=$SECONDS
if [[ ! -f /tmp/site/.complete ]]; then  # unpacked into a fresh folder, marked complete only at the end
  rm -rf /tmp/site /tmp/site.partial && mkdir -p /tmp/site.partial
  cat /tmp/carl_parts/bundle.tar.xz.part* > /tmp/bundle.tar.xz || exit 1
  { tar -xJf /tmp/bundle.tar.xz -C /tmp/site.partial ||
    python3 -c "import tarfile; tarfile.open('/tmp/bundle.tar.xz').extractall('/tmp/site.partial')"; } ||
    { echo "unpacking failed: are all parts staged (ls /tmp/carl_parts)?"; exit 1; }
  touch /tmp/site.partial/.complete && mv /tmp/site.partial /tmp/site
fi
# The image's own `nvidia` package: if it is a namespace package, ours must be one too to merge
# with it; if it is a regular one, ours (first on the path) must stay regular for nvidia.dali.
python3 -c "import nvidia, sys; sys.exit(getattr(nvidia, '__file__', None) is not None)" 2>/dev/null &&
  rm -f /tmp/site/nvidia/__init__.py
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CARL_SCALE_NO_PROGRESS=1
export LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:/tmp/site/nvidia/nvimgcodec:${LD_LIBRARY_PATH:-}
echo "unpacked in $((SECONDS - t0)) s"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch, nvidia.dali as d, deepspeed, av, webdataset; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| dali', d.__version__, '| deepspeed', deepspeed.__version__, '| av', av.__version__)"
} 2>&1 | tee "$out/versions.txt"
rc=0
stage() {  # name, seconds, command...: its output to $out/name.txt, the table also to this log
  local name=$1 limit=$2; shift 2
  [[ "$wanted" == "  " || "$wanted" == *" $name "* ]] || return 0
  echo "=== $name (limit $limit s, at $((SECONDS - t0)) s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1 || { echo "!!! $name failed or timed out: rc $?"; rc=1; }
  grep -v "^\[\|Warning\|warn(" "$out/$name.txt" | tail -"${TAIL:-12}"
}
# the sync-free default step; the frozen stages as cuDNN's fused calls; in one call (trunk_chunk
# above 2BT) against the default's calls of <= 256 frames; then the whole step compiled, without
# and with the fused frozen stages (each compiled row compiles first: ~1 min)
stage step_T80 210 python3 -m carl_scale.bench.step --flavor r50 --frames 80 --batch 2 --iters 10 \
  --extra parallel.fuse_frozen=on parallel.trunk_chunk=100000 parallel.compile=objective \
  parallel.compile=objective,parallel.fuse_frozen=on
stage step_T80_graphs 260 python3 -m carl_scale.bench.step --flavor r50 --frames 80 --batch 2 --iters 10 \
  --extra parallel.compile=trunk parallel.compile=trunk,parallel.fuse_frozen=on \
  parallel.compile=objective,parallel.compile_mode=reduce-overhead \
  parallel.compile=objective,parallel.compile_mode=reduce-overhead,parallel.fuse_frozen=on
stage step_T240 110 python3 -m carl_scale.bench.step --flavor r50 --frames 240 --batch 4 --iters 5 --warmup 2 \
  --extra parallel.fuse_frozen=on parallel.trunk_chunk=100000
TAIL=25 stage gpu_tests 180 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
stage augment 20 python3 -m carl_scale.bench.augment --device cuda --batch 2 --frames 80 --size 224 --iters 10
stage data 90 python3 -m carl_scale.bench.data --device cuda --height 256 --width 340 --frames 80 \
  --image-size 224 --batch 2 --workers 8 --write-workers 16 --videos 16 --whole-videos 2 --batches 10 \
  --paths jpeg/pyav jpeg/dali video/dali --cpu-shares 0.25 0.5
stage e2e_jpeg 50 python3 -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \
  --shards data/bench/340x256_gop30/jpeg --steps 10
stage e2e_jpeg_pyav 50 python3 -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \
  --shards data/bench/340x256_gop30/jpeg --steps 10 --decoder pyav
stage e2e_jpeg_hybrid 50 python3 -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \
  --shards data/bench/340x256_gop30/jpeg --steps 10 --cpu-decode-share 0.25
echo "done in $((SECONDS - t0)) s, rc $rc"
exit $rc
