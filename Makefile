# Two entry points for a fresh machine:
#   make demo   set up .venv, train the tiny config on the built-in corpus (CPU), sample from it
#   make test   set up .venv and run the CPU test suite (what CI runs)
PYTHON_BOOTSTRAP ?= $(shell command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test gpu-test clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON_BOOTSTRAP) -c 'import sys; assert sys.version_info >= (3, 12), "sparsejax needs Python >= 3.12, found " + sys.version' 
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	rm -rf runs/tiny
	$(PY) -m experiments.pretrain --config=configs/tiny.py --config.workdir=runs/tiny --config.resume=False
	$(PY) -m experiments.generate --workdir=runs/tiny --prompt="def " --max_new_tokens=200 --temperature=0.7 --top_p=0.95

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 tests

# On a GPU machine with the project's dependencies installed (see README).
gpu-test:
	python3 -m pytest -q tests/gpu

clean:
	rm -rf runs $(VENV)
