# megatron-tempnet: `make demo` and `make test` work on a fresh machine (CPU is enough).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch is installed explicitly first, so no dependency pulls a CUDA build.
# DeepSpeed installs without its compiled ops (DS_BUILD_OPS=0); we pass torch optimizers.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,deepspeed]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m megatron_tempnet.demo

clean:
	rm -rf $(VENV) demo_out
