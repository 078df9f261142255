# One entry point for people and CI.  `make demo` and `make test` set up everything
# they need (a .venv, the Python packages, Mosquitto) on a fresh Debian/Ubuntu machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tests need every extra, torch included (the compile tests; CPU wheel pinned in
# pyproject).  The demo needs only the simulation stack.
TEST_EXTRAS ?= dev,compile
DEMO_EXTRAS ?= simulate
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= reports/demo

.PHONY: test lint typecheck pytest demo bench clean-venv mosquitto test-tools

test: lint typecheck pytest

lint: $(VENV)/.installed-$(TEST_EXTRAS)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-$(TEST_EXTRAS)
	$(BIN)/mypy

# Two workers (one per core here; more where there are more cores); every test of one
# compiled model stays on one worker (tests/compile/conftest.py: they share its compile).
PYTEST_ARGS ?= --numprocesses=auto --dist=loadgroup --durations=15
pytest: $(VENV)/.installed-$(TEST_EXTRAS) test-tools
	$(BIN)/pytest $(PYTEST_ARGS)

# A 10-agent federation on scikit-learn's digits, label-skewed across agents.  Without
# Mosquitto (no apt-get, no sudo) it runs on fedmq's embedded broker instead.
demo: $(VENV)/.installed-$(DEMO_EXTRAS)
	@$(MAKE) --no-print-directory mosquitto || echo "mosquitto unavailable: the demo uses the embedded broker"
	$(BIN)/fedmq simulate --agents 10 --rounds 21 --evaluate-final --partition dirichlet:0.5 --out $(DEMO_OUT)

bench: $(VENV)/.installed-$(TEST_EXTRAS) mosquitto
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

$(VENV)/.installed-%: pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv; }
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$*]"
	@# onnx2torch (fedmq compile of .onnx files) declares torchvision, which it needs only for
	@# NonMaxSuppression/RoiAlign and whose PyPI wheel does not load beside the CPU torch wheel.
	case ",$*," in *,compile,*) $(BIN)/python -m pip install -q --no-deps "onnx2torch==1.5.15";; esac
	@touch $@

# Mosquitto is started privately by the tests on a random port; we only need the binary,
# and mosquitto-clients for mosquitto_sub (watching the control topics: docs/operations.md).
mosquitto:
	@missing=""; \
	{ [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null; } || missing="$$missing mosquitto"; \
	command -v mosquitto_sub >/dev/null || missing="$$missing mosquitto-clients"; \
	[ -z "$$missing" ] || { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; }

# What the tests run besides Python: Mosquitto and mosquitto_sub (tests/monitor/), and
# systemd-analyze (Debian's systemd package), which tests/deploy/ uses to verify the units
# in deploy/ offline (no systemd needs to run: it works in containers).
test-tools:
	@missing=""; \
	{ [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null; } || missing="$$missing mosquitto"; \
	command -v mosquitto_sub >/dev/null || missing="$$missing mosquitto-clients"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	[ -z "$$missing" ] || { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; }

clean-venv:
	rm -rf $(VENV)
