# Every target builds the local virtual environment itself when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 50051
DATABASE_URL ?= sqlite+aiosqlite:///tokenstream.db

PROTOS := $(shell find protos -name '*.proto')
GEN_FLAGS = -Iprotos --python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1)

TS_DIR   := clients/typescript
TS_STAMP := $(TS_DIR)/node_modules/.installed

.PHONY: venv system-packages run test lint generate check-generated buf-lint pytest ts-check bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: serve on $(HOST):$(PORT) with an embedded SQLite file and the built-in token sources
run: $(STAMP)
	$(BIN)/tokenstream serve --host $(HOST) --port $(PORT) --database-url '$(DATABASE_URL)'

## test: lint, generated-code drift check, TypeScript type check, and the whole test suite
test: system-packages lint check-generated ts-check pytest

## bench: the delivery benchmark on the baseline, SQLite and PostgreSQL (tables; bench-results.json)
bench: $(STAMP) system-packages
	$(BIN)/python -m benchmarks.run --json bench-results.json

## system-packages: the Debian packages the tests need (Node.js, PostgreSQL), if missing
system-packages:
	scripts/system-packages.sh

pytest: $(STAMP) system-packages
	$(BIN)/python -m pytest -q

## lint: ruff, mypy (strict) and buf lint
lint: $(STAMP) buf-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

buf-lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code protos

$(TS_STAMP): $(TS_DIR)/package.json $(TS_DIR)/package-lock.json | system-packages
	cd $(TS_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $(TS_STAMP)

## generate: regenerate gen/ (Python) and clients/typescript/src/gen/ from protos/
generate: $(STAMP) $(TS_STAMP)
	rm -rf gen/tokenstream $(TS_DIR)/src/gen
	mkdir -p gen
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc $(call GEN_FLAGS,gen) $(PROTOS) 2>/dev/null
	$(BIN)/buf generate

## check-generated: fail when generated code differs from what protos/ generate
check-generated: $(STAMP) $(TS_STAMP)
	@tmp=$$(mktemp -d) && \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc $(call GEN_FLAGS,$$tmp) $(PROTOS) 2>/dev/null && \
	$(BIN)/buf generate --output $$tmp && \
	if diff -r $$tmp/tokenstream gen/tokenstream -x __pycache__ && \
	   diff -r $$tmp/$(TS_DIR)/src/gen $(TS_DIR)/src/gen; then echo "generated code is up to date"; rm -rf $$tmp; \
	else echo "generated code is stale: run 'make generate' and commit the result" >&2; rm -rf $$tmp; exit 1; fi

## ts-check: the TypeScript client (generated code included) type-checks
ts-check: $(TS_STAMP)
	cd $(TS_DIR) && node_modules/.bin/tsc --noEmit -p . && node_modules/.bin/tsc --noEmit -p tsconfig.smoke.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
