# Teacher-server venvs, kept apart from .venv (their pins conflict with the project's). Included by the
# Makefile. Stamp files make both targets idempotent: they rebuild only when the pins change.
#
#   make sglang-venv                        .venv-sglang: sglang-jax (CPU / TPU) from requirements-sglang.txt
#   make sglang-venv SGLANG_JAX_EXTRA=tpu   the same plus jax[tpu] (libtpu) on a TPU VM
#   make sglang-gpu-venv                    .venv-sglang-gpu: stock SGLang for CUDA GPUs (needs a GPU host)
#   make sglang-clean                       remove both
#
# Both need Python 3.12 (sglang-jax 0.1.0rc0 and the sglang 0.5.23 wheel are cp312 builds); set
# SGLANG_PYTHON=/path/to/python3.12 if the search below finds none.

# Default: the first Python 3.12 among python3.12 on PATH, pyenv's 3.12.x, /usr(/local)/bin/python3.12.
ifeq ($(origin SGLANG_PYTHON),undefined)
SGLANG_PYTHON := $(firstword $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python \
  /usr/local/bin/python3.12 /usr/bin/python3.12; do "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
  >/dev/null 2>&1 && echo "$$p" && break; done) python3.12)
endif
SGLANG_VENV ?= .venv-sglang
SGLANG_JAX_EXTRA ?= cpu
SGLANG_JAX_VERSION := 0.1.0rc0
SGLANG_STAMP := $(SGLANG_VENV)/.installed-$(SGLANG_JAX_EXTRA)
SGLANG_GPU_VENV ?= .venv-sglang-gpu
SGLANG_GPU_VERSION ?= 0.5.23
SGLANG_GPU_STAMP := $(SGLANG_GPU_VENV)/.installed-$(SGLANG_GPU_VERSION)

# Fails with a readable message when the interpreter is missing or not 3.12.
define sglang_check_python
	@$(1) -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' 2>/dev/null || { \
	  echo "error: $(1) is not a Python 3.12 interpreter; set SGLANG_PYTHON=/path/to/python3.12" >&2; exit 1; }
endef

.PHONY: sglang-venv sglang-gpu-venv sglang-clean

$(SGLANG_STAMP): requirements-sglang.txt
	$(call sglang_check_python,$(if $(wildcard $(SGLANG_VENV)/bin/python),$(SGLANG_VENV)/bin/python,$(SGLANG_PYTHON)))
	test -x $(SGLANG_VENV)/bin/python || $(SGLANG_PYTHON) -m venv $(SGLANG_VENV)
	$(call pip_install,$(SGLANG_VENV)/bin/python,pip==$(PIP_VERSION))
	$(call pip_install,$(SGLANG_VENV)/bin/python,-r requirements-sglang.txt)
	if [ "$(SGLANG_JAX_EXTRA)" != "cpu" ]; then \
	  $(call pip_install,$(SGLANG_VENV)/bin/python,"sglang-jax[$(SGLANG_JAX_EXTRA)]==$(SGLANG_JAX_VERSION)"); fi
	$(SGLANG_VENV)/bin/python -c "import sgl_jax.launch_server, jax; print('sglang-jax ok, jax', jax.__version__)"
	touch $@

sglang-venv: $(SGLANG_STAMP)

$(SGLANG_GPU_STAMP):
	$(call sglang_check_python,$(if $(wildcard $(SGLANG_GPU_VENV)/bin/python),$(SGLANG_GPU_VENV)/bin/python,$(SGLANG_PYTHON)))
	test -x $(SGLANG_GPU_VENV)/bin/python || $(SGLANG_PYTHON) -m venv $(SGLANG_GPU_VENV)
	$(call pip_install,$(SGLANG_GPU_VENV)/bin/python,pip==$(PIP_VERSION))
	$(call pip_install,$(SGLANG_GPU_VENV)/bin/python,"sglang==$(SGLANG_GPU_VERSION)")
	$(SGLANG_GPU_VENV)/bin/python -c "import sglang; print('sglang', sglang.__version__)"
	touch $@

sglang-gpu-venv: $(SGLANG_GPU_STAMP)

sglang-clean:
	rm -rf $(SGLANG_VENV) $(SGLANG_GPU_VENV)
