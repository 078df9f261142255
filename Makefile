# One entry point for people and CI.  `make demo` and `make test` set up everything
# they need (a .venv, the Python packages, Mosquitto) on a fresh Debian/Ubuntu machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel for the compile extra; see README "Compiling models".
EXTRAS ?= dev,compile
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test lint typecheck pytest demo bench clean-venv .mosquitto

test: lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed .mosquitto
	$(BIN)/pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed .mosquitto
	$(BIN)/fedmq simulate --agents 10 --rounds 20 --partition dirichlet:0.5 --out reports/demo

bench: $(VENV)/.installed .mosquitto
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@# onnx2torch (fedmq compile of .onnx files) declares torchvision, which it needs only for
	@# NonMaxSuppression/RoiAlign and whose PyPI wheel does not load beside the CPU torch wheel.
	case ",$(EXTRAS)," in *,compile,*) $(BIN)/python -m pip install -q --no-deps "onnx2torch==1.5.15";; esac
	@touch $@

# Mosquitto is started privately by the tests on a random port; we only need the binary.
.mosquitto:
	@[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null \
		|| { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q mosquitto; }

clean-venv:
	rm -rf $(VENV)
