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

# The one-command GPU run (bench/gpu_run.py, docs/benchmarks.md "The one-command GPU run").
# gpu-bundle: the wheels the GPU machine lacks (bench/gpu_bundle.txt; cp312 or py3-none-any, no
# dependencies: torch, triton, numpy, packaging are there), into an ignored folder that the
# device tool carries. gpu-run: the run itself, on a CUDA machine (python3 there holds torch).
# gpu-smoke: the same script at tiny sizes on the CPU.
GPU_BUNDLE ?= .gpu_bundle
GPU_PYTHON ?= python3
OUT ?= gpu_run_out

.PHONY: gpu-bundle gpu-run gpu-smoke

gpu-bundle:
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_BUNDLE) -r bench/gpu_bundle.txt
	ls -l $(GPU_BUNDLE) && du -sh $(GPU_BUNDLE)

gpu-run:
	$(GPU_PYTHON) bench/gpu_run.py $(OUT)

gpu-smoke: install
	$(PY) bench/gpu_run.py --smoke $(OUT)
