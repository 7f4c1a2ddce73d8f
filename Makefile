# `make run`: set up .venv and run the default job (`make run SEED=1`: another seed).  `make test`: run the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build: pip finds it on disk here; elsewhere it comes from PyPI. Override for another build,
# e.g. make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml
SEED ?= 0
STAMP := $(VENV)/.installed

.PHONY: run test bench clean-venv

$(STAMP): pyproject.toml
	@# A torch already in $(PY) (e.g. a CUDA build on a GPU machine) is kept: the venv sees it.
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "using the torch of $(PY)"; $(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV) && $(BIN)/pip install --quiet $(TORCH_SPEC); \
	fi
	@# torch first, then the rest: evotorch's plain `torch` requirement is then already met, so pip
	@# never swaps in a multi-GB CUDA build.
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/evo-subens run $(CONFIG) seed=$(SEED)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/evo-subens bench throughput

clean-venv:
	rm -rf $(VENV)
