# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv on a fresh clone and installs the pinned versions first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Two workers: subprocess-heavy tests (teacher server, multi-process, resume-after-kill) overlap with compute.
# loadfile: a test file's tests share one worker, so a module-scoped fixture (a whole training run) is built
# once. (loadgroup does not group under pytest 9.2 + pytest-xdist 3.8: xdist renames item._nodeid, which
# pytest 9.2 no longer reads, so every module fixture was built on both workers.)
PYTEST_ARGS ?= -n 2 --dist loadfile --durations=15

.PHONY: demo test install clean bench aot tpu-venv

include mk/pip.mk
include mk/sglang.mk
.DEFAULT_GOAL := demo

$(STAMP): requirements.txt requirements-test.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call pip_install,$(PY),pip==$(PIP_VERSION))
	$(call pip_install,$(PY),-r requirements.txt -r requirements-test.txt)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m agq_jax.demo

# The TPU compiler on this CPU host: .venv-tpu is .venv plus libtpu (the wheel `jax[tpu]` of the pinned jax
# installs), layered with a .pth file so both run the very same jax / flax. ~20 s from a cached wheel.
LIBTPU_VERSION := 0.0.42.1
TPU_VENV := .venv-tpu
TPU_STAMP := $(TPU_VENV)/.installed-libtpu-$(LIBTPU_VERSION)

$(TPU_STAMP): $(STAMP)
	test -x $(TPU_VENV)/bin/python || $$($(PY) -c 'import sys; print(sys._base_executable)') -m venv $(TPU_VENV)
	$(call pip_install,$(TPU_VENV)/bin/python,--no-deps libtpu==$(LIBTPU_VERSION))
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
	  $$($(TPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/agq_base_venv.pth
	JAX_PLATFORMS=cpu $(TPU_VENV)/bin/python -c "import jax, libtpu, flax; print('libtpu ok, jax', jax.__version__)"
	touch $@

tpu-venv: $(TPU_STAMP)

# Every TPU layout of the shipped configs compiled for its slice (docs/launch.md's table); cached in runs/aot.
AOT_CONFIGS ?= configs/0_6b.py configs/8b.py configs/30b_a3b.py configs/235b_a22b.py
aot: $(TPU_STAMP)
	JAX_PLATFORMS=cpu PYTHONPATH=$(CURDIR) $(TPU_VENV)/bin/python -m agq_jax.aot.sweep $(AOT_CONFIGS)

# The suite includes a real SGLang (sglang-jax, CPU) teacher server, so it needs .venv-sglang too, and the
# TPU compiler (.venv-tpu) for tests/test_aot.py.
test: $(STAMP) $(SGLANG_STAMP) $(TPU_STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(TPU_VENV) build *.egg-info
