# supersede — one entry point for humans and CI.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test lint lint-types format run bench chaos soak clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install supersede with its dev tools

# One worker per CPU the process may use (its affinity; a container's CPU quota is not
# counted) and one more, at most four, each with its own servers: the suite mostly waits on
# subprocesses and servers (two workers on two CPUs kept them 70% busy: 15 min 43 s on a machine
# 2.5 times slower than the usual one, 15 min 15 s with three).
WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0)) + 1))")
test: $(STAMP) ## run the test suite in parallel workers (each starts its own servers on free ports)
	$(BIN)/pytest -q -n $(WORKERS) --dist worksteal

# mypy resolves modules by folder name, so it checks `supersede` through a tree of links that
# lays shared/, services/ and lua/ out as the installed package (pyproject's package-dir).
TYPES := $(VENV)/typecheck

lint: $(STAMP) ## ruff format check, ruff lint, mypy strict (package, tests, bench, chaos)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	@$(MAKE) --no-print-directory lint-types

lint-types: $(STAMP) ## mypy strict alone (what `make lint` runs last)
	@rm -rf $(TYPES) && mkdir -p $(TYPES)/supersede
	@for f in shared/*.py shared/py.typed; do ln -s "$(CURDIR)/$$f" $(TYPES)/supersede/; done
	@ln -s "$(CURDIR)/services" $(TYPES)/supersede/services
	@ln -s "$(CURDIR)/lua" $(TYPES)/supersede/lua
	MYPYPATH=$(TYPES) $(BIN)/mypy $(TYPES)/supersede tests bench chaos

format: $(STAMP) ## apply ruff formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

run: $(STAMP) ## run the system and its demo (embedded server unless SUPERSEDE_REDIS_URL is set)
	$(BIN)/supersede dev

bench: $(STAMP) ## print BENCH lines (each starts its own server)
	$(BIN)/python -m bench

soak: $(STAMP) ## 10 minutes of steady load: SOAK line, memory must plateau
	$(BIN)/python -m bench.soak --duration 600

DURATION ?= 180
chaos: $(STAMP) ## faults for DURATION s (180) on one server, then on a cluster; CHAOS lines
	$(BIN)/python -m chaos --duration $(DURATION)
	$(BIN)/python -m chaos --duration $(DURATION) --cluster

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis *.egg-info
