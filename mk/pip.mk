# `pip install` that survives a dropped connection: CI once lost a run to a 55 MB wheel cut off at 47 MB
# five times in a row (pip's own resume retries), so the whole install is retried after a pause.
# Included by the Makefile and mk/sglang.mk.
PIP_ATTEMPTS ?= 3
PIP_RETRY_PAUSE ?= 30
PIP_VERSION := 26.3

# $(call pip_install,PYTHON,ARGS): a recipe line; fails naming ARGS after PIP_ATTEMPTS tries.
define pip_install
	for i in $$(seq $(PIP_ATTEMPTS)); do $(1) -m pip install -q --retries 10 $(2) && break; \
	  if [ $$i -eq $(PIP_ATTEMPTS) ]; then echo "error: pip install $(2) failed $(PIP_ATTEMPTS) times" >&2; exit 1; fi; \
	  echo "pip install $(2) failed (attempt $$i of $(PIP_ATTEMPTS)); retrying in $(PIP_RETRY_PAUSE) s" >&2; sleep $(PIP_RETRY_PAUSE); done
endef
