# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv on a fresh clone and installs the pinned versions first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Two workers: subprocess-heavy tests (teacher server, multi-process, resume-after-kill) overlap with compute.
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=15

.PHONY: demo test install clean bench

include mk/sglang.mk
.DEFAULT_GOAL := demo

$(STAMP): requirements.txt requirements-test.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m agq_jax.demo

# The suite includes a real SGLang (sglang-jax, CPU) teacher server, so it needs .venv-sglang too.
test: $(STAMP) $(SGLANG_STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
