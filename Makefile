# make setup: .venv with requirements.txt and inplace-abn (once; later runs do nothing)
# make test:  the test suite (the CUDA tests run where a GPU is visible)
# make test-fast: the suite less the slowest tests (whole runs in subprocesses, torchrun, compile)
# make demo:  train a small CMAL-Net on a generated fine-grained dataset (a GPU when visible)
# make bench: throughput and memory of one training iteration and of evaluation
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup test test-fast demo bench clean
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/setup.sh tools/build_inplace_abn.sh
	bash tools/setup.sh $(VENV)
	touch $@

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) -m cmal.tools.demo

bench: setup
	$(PY) -m cmal.tools.bench

clean:
	rm -rf $(VENV) .pytest_cache data/demo Results_demo
