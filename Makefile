# expertmesh: `make demo` and `make test` work from a fresh clone (they create .venv and install).
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
MODEL  ?= models/tiny-v3
PROMPT ?= Hello, experts!

.PHONY: demo test lint lock bench-moe gpu-bundle gpu-check gpu-check-dry clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Installs take every version from constraints.txt (the tested set): `make clean test CONSTRAINTS=` takes the newest
# that pyproject.toml allows instead (an existing .venv is not reinstalled), and `make lock` rewrites
# constraints.txt from such a fresh install.
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
	$(PY) -X faulthandler -m pytest -q --durations=25

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench-moe: $(VENV)/.installed
	$(PY) benchmarks/moe_layer.py

# The GPU check (docs/gpu-check.md). gpu-bundle builds, here, the cp312 wheels the lent GPU machine's image lacks
# (.gpu-bundle/, size printed, under the 64 MiB that may travel with the tree); gpu-check runs there with the
# image's python3 (no venv, no registry: GPU_PY=.venv/bin/python GPU_CHECK_FLAGS=--no-bundle where pip works);
# gpu-check-dry runs every step's setup here and skips the GPU steps.
GPU_PY ?= python3
GPU_CHECK_FLAGS ?=
gpu-bundle:
	python3 benchmarks/gpu_bundle.py

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(GPU_CHECK_FLAGS)

gpu-check-dry: $(VENV)/.installed
	$(PY) benchmarks/gpu_check.py --dry-run $(GPU_CHECK_FLAGS)

clean:
	rm -rf $(VENV) models .pytest_cache
