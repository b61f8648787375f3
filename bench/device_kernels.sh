#!/usr/bin/env bash
# One call on a lent GPU machine (see bench/README.md): install headscope without its dependencies (the machine
# has torch, triton and transformers, and no network), run the kernel tests compiled (TRITON_INTERPRET=0), then
# the three kernel benchmarks. Logs go to $OUT (the device tool brings that folder back).
#   bash bench/device_kernels.sh            # needs .devdata/smollm2_qkv.pt from
#                                           #   python bench/bench_kernel_attention_stats.py --capture
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
OUT=${OUT:-/tmp/headscope_device}; mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site "$REPO" || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
cd /tmp   # away from the repo root, so `headscope` is the installed one
# the import-behaviour tests of test_kernels.py run subprocesses without PYTHONPATH: CPU-only, skipped here
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m "not slow" --durations=8 \
    -k "not import and not top_level and not probe and not wheel and not interpreter" \
    "$REPO"/tests/test_kernels.py "$REPO"/tests/test_kernel_*.py 2>&1 | tee "$OUT/pytest.log" | tail -25
for b in ${BENCHES:-attention_stats sparse_decode stat_topk}; do
    echo; echo "===== bench_kernel_$b ====="
    timeout ${BENCH_TIMEOUT:-150} python3 "$REPO/bench/bench_kernel_$b.py" 2>&1 | tee "$OUT/bench_$b.log"
done
