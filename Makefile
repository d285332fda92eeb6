# The two commands of this project (see README.md):
#   make demo   set up .venv (first time only), then run the main job on the "shapes" dataset
#   make test   set up .venv (first time only), then run the whole test suite
# make demo2 runs the same job with the Mask2Former config.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: env demo demo2 test

env:
	@bash scripts/install_env.sh

demo: env
	$(PY) tools/run_demo.py $(DEMO_ARGS)

demo2: env
	$(PY) tools/run_demo.py --config-file configs/shapes/maskformer2_R18_shapes.yaml \
		--output output/demo_mask2former $(DEMO_ARGS)

test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)
