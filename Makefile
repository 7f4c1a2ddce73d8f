# `make run`: set up .venv (and system packages) and run the default job (`make run SEED=1`: another
# seed).  `make test`: run the test suite (what CI runs).  `make test-fast`: the tests marked neither
# slow, ray nor cluster (markers in pyproject.toml), in under a minute.  `make readme-check`: the
# README's Quick start output against what the code prints now.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build: pip finds it on disk here; elsewhere it comes from PyPI. Override for another build,
# e.g. make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu'.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml
SEED ?= 0
STAMP := $(VENV)/.installed

# System packages, each skipped when what it provides is there: Debian's Fashion-MNIST
# (configs/fashion-mnist.yaml, the benchmarks and its tests, which skip without it) and the Qt 5 runtime
# that EnvPool's ProcGen links against (procgen:<game> environments and their tests, which fail without
# it). Installed with apt-get when this runs as root, else one line each says what to install.
SYSTEM_PACKAGES ?= dataset-fashion-mnist libqt5gui5
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
QT5_GUI_LIB ?= $(firstword $(wildcard /usr/lib/*/libQt5Gui.so.5 /usr/lib64/libQt5Gui.so.5 /usr/lib/libQt5Gui.so.5) \
	/usr/lib/libQt5Gui.so.5)
APT_GET ?= apt-get
AS_ROOT ?= $(shell [ "$$(id -u)" = 0 ] && echo yes)

.PHONY: run test test-fast bench readme-check clean-venv system-packages

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

system-packages:
	@missing=""; needs=""; \
	for package in $(SYSTEM_PACKAGES); do \
		case $$package in \
			dataset-fashion-mnist) there="$(FASHION_MNIST_DIR)"; \
				why="Fashion-MNIST configs and tests need the system package";; \
			libqt5gui5) there="$(QT5_GUI_LIB)"; \
				why="ProcGen environments (procgen:<game>) and their tests need the system package";; \
			*) there=""; why="this project needs the system package"; \
				dpkg-query -W -f='$${Status}' $$package 2>/dev/null | grep -q "ok installed" && continue;; \
		esac; \
		if [ -n "$$there" ] && [ -e "$$there" ]; then continue; fi; \
		missing="$$missing $$package"; needs="$$needs$$why $$package|"; \
	done; \
	missing=$${missing# }; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$(AS_ROOT)" = yes ] && command -v $(APT_GET) >/dev/null; then \
		echo "installing $$missing with apt-get"; \
		{ $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq $$missing; } \
			|| echo "note: apt-get could not install $$missing; $$(echo "$${needs%|}" | sed 's/|/; /g')"; \
	else \
		echo "$${needs%|}" | tr '|' '\n' | while read -r line; do \
			echo "note: $$line: sudo apt-get install $${line##* }"; done; \
	fi

run: $(STAMP) system-packages
	$(BIN)/evo-subens run $(CONFIG) seed=$(SEED)

# The suite in TEST_WORKERS processes (pytest-xdist), each running whole modules (a module's shared
# runs are made once); TEST_WORKERS=0: in this process.
TEST_WORKERS ?= 2
test: $(STAMP) system-packages
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

test-fast: $(STAMP) system-packages
	$(BIN)/python -m pytest -q -m "not slow and not ray and not cluster"

bench: $(STAMP)
	$(BIN)/evo-subens bench throughput

# The README's Quick start output against what the default job prints now (as long as `make run`).
readme-check: $(STAMP)
	$(BIN)/python tests/readme_output.py

clean-venv:
	rm -rf $(VENV)
