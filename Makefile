# `make install` builds .venv from scratch; `make test` runs the suite (installing first if needed).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CUDA toolkit: CUDA_HOME if set, else /usr/local/cuda, else the folder above nvcc's bin/. (torch's own guess
# takes `which nvcc`/../.., which is wrong where nvcc is a wrapper script in /usr/local/bin, as on this machine.)
# The extension builds CUDA kernels when a toolkit is found and either a GPU is visible or FORCE_CUDA=1.
CUDA_HOME ?= $(or $(wildcard /usr/local/cuda),$(shell n=$$(command -v nvcc) && dirname $$(dirname $$(readlink -f $$n))))
export CUDA_HOME

.PHONY: install test build-ext bench-op demo clean

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c requirements/constraints.txt -r requirements/runtime.txt
	bash scripts/install_detectron2.sh $(PY)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import sparse_detr, sparse_detr.layers as L; print('sparse_detr', sparse_detr.__version__, '| compiled op:', L.ms_deform_attn_available())"
	touch $(STAMP)

$(STAMP):
	$(MAKE) install

test: $(STAMP)
	$(PY) -m pytest -q tests

# Rebuild the extension in place after editing csrc/ (faster than a full install).
build-ext: $(STAMP)
	$(PY) setup.py build_ext --inplace

bench-op: $(STAMP)
	$(PY) projects/SparseDETR/bench_op.py

clean:
	rm -rf build *.egg-info sparse_detr/_C*.so
