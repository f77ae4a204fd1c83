# expertmesh: `make demo` and `make test` work from a fresh clone (they create .venv and install).
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
MODEL  ?= models/tiny-v3
PROMPT ?= Hello, experts!

.PHONY: demo test lint bench-moe clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch is pinned first: on these machines 2.13.0 is a local CPU build; a looser pin pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(MODEL)/config.json: | $(VENV)/.installed
	$(BIN)/expertmesh make-model --preset $(notdir $(MODEL)) --out $(MODEL)

demo: $(VENV)/.installed $(MODEL)/config.json
	$(BIN)/expertmesh generate --model $(MODEL) --prompt "$(PROMPT)" --max-new-tokens 16

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench-moe: $(VENV)/.installed
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) models .pytest_cache
