# `make install` builds .venv from scratch; `make test` runs the fast tier (the inner loop: a few minutes on 2 cores),
# `make test-all` every test including the slow tier (end-to-end training, multi-process runs, export compilation,
# the GPU check's dry run, the web demo in headless Chromium; CI runs it), `make lint` ruff and the import layers
# (each installs first if needed). `make demo` trains the demo model, `make app` shows it on a local web page.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CUDA toolkit: CUDA_HOME if set, else /usr/local/cuda, else the folder above nvcc's bin/. (torch's own guess
# takes `which nvcc`/../.., which is wrong where nvcc is a wrapper script, e.g. one in /usr/local/bin.)
# The extension builds CUDA kernels when a toolkit is found and either a GPU is visible or FORCE_CUDA=1.
CUDA_HOME ?= $(or $(wildcard /usr/local/cuda),$(shell n=$$(command -v nvcc) && dirname $$(dirname $$(readlink -f $$n))))
export CUDA_HOME

.PHONY: install test test-all lint build-ext bench-op demo app gpu-wheels gpu-check clean

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c requirements/constraints.txt -r requirements/runtime.txt -r requirements/export.txt \
		-r requirements/lint.txt -r requirements/app.txt
	bash scripts/install_detectron2.sh $(PY)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import sparse_detr, sparse_detr.layers as L; print('sparse_detr', sparse_detr.__version__, '| compiled op:', L.ms_deform_attn_available())"
	touch $(STAMP)

$(STAMP):
	$(MAKE) install

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# the browser test's Chromium: Debian's packages, installed as root, else the test skips saying why
test-all: $(STAMP)
	bash scripts/install_browser.sh
	$(PY) -m pytest -q tests

# ruff and import-linter (pinned), configured in pyproject.toml; `$(VENV)/bin/ruff check --fix . &&
# $(VENV)/bin/ruff format .` fixes most of ruff's findings; lint-imports checks that the package's folders import
# only downward (the layers ARCHITECTURE.md draws)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Rebuild the extension in place after editing csrc/ (faster than a full install).
build-ext: $(STAMP)
	$(PY) setup.py build_ext --inplace

bench-op: $(STAMP)
	$(PY) projects/SparseDETR/bench_op.py

# The main job, on the CPU in minutes: generates the synthetic shapes dataset on first use (under
# $SPARSE_DETR_DATASETS, default ./datasets), evaluates the untrained model, trains Sparse DETR (rho 0.3) from
# scratch, evaluates it with COCOEvaluator and draws its detections and kept tokens to output/demo/detections.png.
DEMO_CFG := configs/demo/sparse_detr_shapes.yaml
DEMO_IMAGE = $${SPARSE_DETR_DATASETS:-datasets}/synthetic_shapes/val/images/000000.jpg
demo: $(STAMP)
	@echo "==> COCO AP of the untrained (randomly initialized) model"
	$(PY) train_net.py --config-file $(DEMO_CFG) --eval-only OUTPUT_DIR output/demo/untrained
	@echo "==> Training"
	$(PY) train_net.py --config-file $(DEMO_CFG)
	$(PY) projects/SparseDETR/demo.py --config-file $(DEMO_CFG) --input $(DEMO_IMAGE) \
		--output output/demo/detections.png --confidence-threshold 0.5 MODEL.WEIGHTS output/demo/model_final.pth
	@echo "==> Box AP on synthetic_shapes_val (AP, AP50, AP75, APs, APm, APl)"
	@echo "untrained: $$(grep 'copypaste: [0-9n]' output/demo/untrained/log.txt | tail -n 1 | sed 's/.*copypaste: //')"
	@echo "trained:   $$(grep 'copypaste: [0-9n]' output/demo/log.txt | tail -n 1 | sed 's/.*copypaste: //')"
	@echo "picture:   output/demo/detections.png"

# The web demo on the model `make demo` trained: http://127.0.0.1:7860 (projects/SparseDETR/app.py; Ctrl-C stops it).
APP_WEIGHTS ?= output/demo/model_final.pth
app: $(STAMP)
	@test -f $(APP_WEIGHTS) || { echo "$(APP_WEIGHTS) not found: run \`make demo\` first (it trains the model, ~15 minutes on the CPU)"; exit 1; }
	$(PY) projects/SparseDETR/app.py --config-file $(DEMO_CFG) MODEL.WEIGHTS $(APP_WEIGHTS)

# The GPU check (scripts/gpu_check.py): on a machine with one GPU, builds the CUDA kernels for it, runs the CUDA
# tests, bench_op's CUDA rows, the throughput table and 100 AMP training iterations in at most 8 minutes, and
# writes every table and log into $(OUT) (at most 8 files). CHECK_PY is the Python to check; what it lacks is
# installed into it, offline, from $(WHEELS), which `make gpu-wheels` fills here, with network, for Python 3.12.
# $(WHEELS) is git-ignored (wheels are never committed): copy it to the GPU machine with the working tree, naming it
# explicitly where only what git tracks is copied.
# DRY_RUN=1 runs the same steps on the CPU with tiny sizes (tests/test_gpu_check.py does).
CHECK_PY ?= python3
WHEELS ?= .whl
OUT ?= output/gpu-check
DRY_RUN ?= 0
gpu-wheels:
	bash scripts/gpu_wheels.sh $(PY) $(WHEELS)

gpu-check:
	$(CHECK_PY) scripts/gpu_check.py $(OUT) --wheels $(WHEELS) $(if $(filter-out 0,$(DRY_RUN)),--dry-run)

clean:
	rm -rf build *.egg-info sparse_detr/_C*.so
