#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE (see prepare.sh): stage the carried wheel parts under /tmp (they stay
# while the machine is warm), and without --stage reassemble and install them into /tmp/site, then
# run the GPU tests and the benchmarks, writing every table under $OUT. Well inside 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /tmp/carl_parts /tmp/carl_wheels
cp .whl/c*/* /tmp/carl_parts/ 2>/dev/null
echo "staged: $(ls /tmp/carl_parts | wc -l) parts"
[[ "${1:-}" == "--stage" ]] && exit 0
out=${OUT:-/tmp/carl_out}; mkdir -p "$out"
for first in /tmp/carl_parts/*.part00; do
  name=$(basename "${first%.part00}"); cat /tmp/carl_parts/"$name".part* > /tmp/carl_wheels/"$name"
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/carl_wheels/*.whl || exit 1
DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site \
  /tmp/carl_wheels/deepspeed-*.tar.gz || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CARL_SCALE_NO_PROGRESS=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, nvidia.dali as d, deepspeed, av; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| dali', d.__version__, '| deepspeed', deepspeed.__version__, '| av', av.__version__)"
} 2>&1 | tee "$out/versions.txt"
rc=0
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" || rc=1
timeout 120 python3 -m carl_scale.bench.step --flavor r50 --frames 80 --batch 2 --iters 10 2>&1 | tail -6 | tee "$out/step_T80.txt" || rc=1
timeout 120 python3 -m carl_scale.bench.step --flavor r50 --frames 240 --batch 4 --iters 5 2>&1 | tail -6 | tee "$out/step_T240.txt" || rc=1
timeout 120 python3 -m carl_scale.bench.data --device cuda 2>&1 | tail -15 | tee "$out/data.txt" || rc=1
exit $rc
