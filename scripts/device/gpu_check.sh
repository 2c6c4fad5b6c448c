#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE (see prepare.sh). With --stage: copy this call's parts under /tmp
# (they stay while the machine is warm) and stop. Without: stage, unpack what has arrived (the core
# tree from .whl/c1; DALI's tree once all its parts are staged), then run the stages named, each
# under its own time limit, writing every table under $OUT. A call cut short still returns what it
# measured. The step needs no DALI, so the most important measurements come with the first call
# (prepare.sh's counts: .whl/c1 holds the core tree and DALI's first part, c2 and c3 the rest):
#   bash scripts/device/gpu_check.sh step_T80 step_T240 gpu_tests             (carry .whl/c1; <= 9 min)
#   bash scripts/device/gpu_check.sh --stage                                  (carry .whl/c2 .. c(N-1))
#   bash scripts/device/gpu_check.sh data e2e_jpeg gpu_tests_dali e2e_jpeg_hybrid augment e2e_jpeg_threads
#                                                                             (carry .whl/cN; <= 7.5 min)
#   bash scripts/device/gpu_check.sh step_T80_graphs e2e_jpeg_pyav e2e_jpeg_priority  (if time is left)
# The machine goes back after 30 s idle, and the staged parts with it: make the calls back to back.
# No stage names: every stage (~20 minutes: more than one call may run).
set -uo pipefail
cd "$(dirname "$0")/../.."
tmp=${CARL_DEVICE_TMP:-/tmp}  # where the parts and trees stay while the machine is warm
mkdir -p "$tmp/carl_parts"
cp .whl/c*/* $tmp/carl_parts/ 2>/dev/null
echo "staged: $(ls $tmp/carl_parts | tr '\n' ' ')"
[[ "${1:-}" == "--stage" ]] && exit 0
wanted=" $* "  # empty: every stage
out=${OUT:-/tmp/carl_out}; mkdir -p "$out"
t0=$SECONDS
unpack() {  # tree, parts...: into $tmp/tree, marked complete only at the end (a cut call redoes it)
  local tree=$1; shift
  [[ -f $tmp/$tree/.complete ]] && return 0
  rm -rf "$tmp/$tree" "$tmp/$tree.partial" && mkdir -p "$tmp/$tree.partial"
  cat "$@" > "$tmp/$tree.tar.xz" || return 1
  { tar -xJf "$tmp/$tree.tar.xz" -C "$tmp/$tree.partial" ||
    python3 -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
      "$tmp/$tree.tar.xz" "$tmp/$tree.partial"; } || { echo "unpacking $tree failed"; return 1; }
  rm -f "$tmp/$tree.tar.xz"; touch "$tmp/$tree.partial/.complete" && mv "$tmp/$tree.partial" "$tmp/$tree"
}
[[ -f $tmp/carl_parts/core.tar.xz ]] || { echo "the core tree is not staged: carry .whl/c1 (bash scripts/device/prepare.sh makes it)"; exit 1; }
unpack site_core $tmp/carl_parts/core.tar.xz || exit 1
# DALI's parts are named dali.tar.xz.partKK-of-NN: unpacked once all NN have arrived
dali_parts=($tmp/carl_parts/dali.tar.xz.part*-of-*)
dali_total=0; [[ -e "${dali_parts[0]}" ]] && dali_total=$((10#${dali_parts[0]##*-of-}))
have_dali=0
if (( dali_total > 0 && ${#dali_parts[@]} == dali_total )); then
  unpack site_dali "${dali_parts[@]}" && have_dali=1
  # The image's own `nvidia` package: if it is a namespace package, ours must be one too to merge
  # with it; if it is a regular one, ours (first on the path) must stay regular for nvidia.dali.
  python3 -c "import nvidia, sys; sys.exit(getattr(nvidia, '__file__', None) is not None)" 2>/dev/null &&
    rm -f $tmp/site_dali/nvidia/__init__.py
fi
dali_note="DALI: $([[ -e "${dali_parts[0]}" ]] && echo "${#dali_parts[@]} of $dali_total" || echo 0) parts staged"
export PYTHONPATH=$tmp/site_core:$tmp/site_dali:$PWD PYTHONUNBUFFERED=1 CARL_SCALE_NO_PROGRESS=1
export LD_LIBRARY_PATH=$tmp/site_dali/nvidia/cu13/lib:$tmp/site_dali/nvidia/nvimgcodec:${LD_LIBRARY_PATH:-}
echo "unpacked in $((SECONDS - t0)) s; $dali_note"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch, deepspeed, av, webdataset; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| av', av.__version__)"
  ((have_dali)) && python3 -c "import nvidia.dali as d; print('dali', d.__version__)"
} 2>&1 | tee -a "$out/versions.txt"
rc=0
needs_dali="gpu_tests_dali data e2e_jpeg e2e_jpeg_pyav e2e_jpeg_hybrid e2e_jpeg_threads e2e_jpeg_priority"
stage() {  # name, seconds, command...: its output to $out/name.txt, the table also to this log
  local name=$1 limit=$2; shift 2
  [[ "$wanted" == "  " || "$wanted" == *" $name "* ]] || return 0
  if [[ " $needs_dali " == *" $name "* ]] && ! ((have_dali)); then
    echo "!!! $name needs DALI ($dali_note): carry the rest of .whl/c2 .. first"; rc=1; return 0
  fi
  echo "=== $name (limit $limit s, at $((SECONDS - t0)) s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1 || { echo "!!! $name failed or timed out: rc $?"; rc=1; }
  grep -v "^\[\|Warning\|warn(" "$out/$name.txt" | tail -"${TAIL:-12}"
}
# the sync-free default step; the frozen stages as cuDNN's fused calls; in one call (trunk_chunk
# above 2BT) against the default's calls of <= 256 frames; then the whole step compiled, with and
# without the fused frozen stages (each compiled row compiles first: ~1 min; the likely best first)
stage step_T80 240 python3 -m carl_scale.bench.step --flavor r50 --frames 80 --batch 2 --iters 10 \
  --extra parallel.fuse_frozen=on parallel.trunk_chunk=100000 parallel.compile=objective,parallel.fuse_frozen=on \
  parallel.compile=objective
stage step_T80_graphs 260 python3 -m carl_scale.bench.step --flavor r50 --frames 80 --batch 2 --iters 10 \
  --extra parallel.compile=trunk parallel.compile=trunk,parallel.fuse_frozen=on \
  parallel.compile=objective,parallel.compile_mode=reduce-overhead \
  parallel.compile=objective,parallel.compile_mode=reduce-overhead,parallel.fuse_frozen=on
stage step_T240 110 python3 -m carl_scale.bench.step --flavor r50 --frames 240 --batch 4 --iters 5 --warmup 2 \
  --extra parallel.fuse_frozen=on parallel.trunk_chunk=100000
# the GPU tests that need no DALI with the first call; DALI's (decoders, loader, a run from shards) later
# (-v: a stage cut short by its limit still shows which tests passed)
TAIL=25 stage gpu_tests 150 python3 -m pytest -v -m "gpu and not dali" tests/test_gpu.py -p no:cacheprovider
stage augment 30 python3 -m carl_scale.bench.augment --device cuda --batch 2 --frames 80 --size 224 --iters 10
# the jpeg/dali rows also with nvJPEG's other settings: all to the hardware JPEG decoder, the Huffman
# stage on the GPU (Kinetics-size frames are under DALI's 1-MPixel threshold: host threads by default);
# each dali path also with 4 decoders side by side (does NVDEC's ~3.8k frames/s grow with sessions?),
# and its loader with 2 and 4 finishing threads side by side (the fix if it does: --finish-threads)
stage data 160 python3 -m carl_scale.bench.data --device cuda --height 256 --width 340 --frames 80 \
  --image-size 224 --batch 2 --workers 8 --write-workers 16 --videos 16 --whole-videos 2 --batches 10 \
  --paths jpeg/pyav jpeg/dali video/dali --cpu-shares 0.25 0.5 --nvjpeg hw_load=1 huffman=gpu hw_load=0,huffman=gpu \
  --side-by-side 4 --finish-threads 2 4
stage e2e_jpeg 50 python3 -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \
  --shards data/bench/340x256_gop30/jpeg --steps 10
stage e2e_jpeg_pyav 50 python3 -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \
  --shards data/bench/340x256_gop30/jpeg --steps 10 --decoder pyav
stage e2e_jpeg_hybrid 50 python3 -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \
  --shards data/bench/340x256_gop30/jpeg --steps 10 --cpu-decode-share 0.25
stage e2e_jpeg_threads 50 python3 -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \
  --shards data/bench/340x256_gop30/jpeg --steps 10 --set data.finish_threads=2
# the step's stream ahead of the loader's (its crops and colour fill the gaps): the alongside row tells
stage e2e_jpeg_priority 50 python3 -m carl_scale.bench.e2e --flavor r50 --frames 80 --batch 2 --workers 8 \
  --shards data/bench/340x256_gop30/jpeg --steps 10 --set parallel.step_priority=high
# DALI's GPU tests last: they passed on the last GPU machine; a call cut by the session's device
# time loses them rather than a measurement
TAIL=25 stage gpu_tests_dali 120 python3 -m pytest -v -m "gpu and dali" tests/test_gpu.py -p no:cacheprovider
echo "done in $((SECONDS - t0)) s, rc $rc"
exit $rc
