#!/usr/bin/env bash
# Set up (first time only), check and test: ruff, mypy, then pytest over
# tests/unit, tests/integration and tests/e2e. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" dev
export FACTORY_HOME="${FACTORY_HOME:-$(mktemp -d)}"
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
