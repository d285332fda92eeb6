# The two commands of this project (see README.md):
#   make demo   set up .venv (first time only), then run the main job on the "shapes" dataset
#   make test   set up .venv (first time only), then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: env demo test

env:
	@bash scripts/install_env.sh

demo: env
	$(PY) tools/run_demo.py $(DEMO_ARGS)

test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)
