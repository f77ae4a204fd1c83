# expertmesh: `make demo` and `make test` work from a fresh clone (they create .venv and install).
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
MODEL  ?= models/tiny-v3
PROMPT ?= Hello, experts!

.PHONY: demo test lint lock bench-moe gpu-check clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Installs take every version from constraints.txt (the tested set): `make test CONSTRAINTS=` takes the newest that
# pyproject.toml allows instead, and `make lock` rewrites constraints.txt from such a fresh install.
# torch is pinned first: on these machines 2.13.0 is a local CPU build; a looser pin pulls a CUDA build.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet $(PIP_C) torch==2.13.0
	$(PY) -m pip install --quiet $(PIP_C) -e ".[dev]"
	touch $@

lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock && .venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet torch==2.13.0
	.venv-lock/bin/python -m pip install --quiet -e ".[dev]"
	{ sed -n '1,2p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
	  | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-lock
	@echo "constraints.txt rewritten; run make clean test to try it"

$(MODEL)/config.json: | $(VENV)/.installed
	$(BIN)/expertmesh make-model --preset $(notdir $(MODEL)) --out $(MODEL)

# The mesh on one machine: an embedded local Ray with 4 expert-group actors, 16 tokens, then the routing, the
# per-device dispatch and the start of the request's routing trace.
demo: $(VENV)/.installed $(MODEL)/config.json
	$(BIN)/expertmesh generate --model $(MODEL) --backend ray --devices 4 --prompt "$(PROMPT)" --max-new-tokens 16

test: $(VENV)/.installed
	$(PY) -X faulthandler -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench-moe: $(VENV)/.installed
	$(PY) benchmarks/moe_layer.py

# On a GPU machine the torch pin above installs PyPI's CUDA build of 2.13.0; a venv made on a CPU machine (torch
# +cpu) is refused by the first line. Runs all three steps, then fails if any failed (a lease is too short to rerun).
gpu-check: $(VENV)/.installed
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch ' \
	  + torch.__version__ + ' sees no CUDA GPU (no GPU here, or a CPU build of torch in $(VENV))')"
	@mkdir -p benchmarks/results; status=0; \
	$(PY) -m pytest -m gpu -q -rs --junitxml=benchmarks/results/gpu_tests.xml || status=1; \
	$(PY) benchmarks/kernel_bench.py --json benchmarks/results/kernels.json || status=1; \
	$(PY) benchmarks/gpu_e2e.py --json benchmarks/results/gpu_e2e.json || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) models .pytest_cache
