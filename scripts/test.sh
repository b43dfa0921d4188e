#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite. Needs Redis at 127.0.0.1:6379
# (.ci/run starts one when none answers). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export RECSYS_DATA_DIR="${RECSYS_DATA_DIR:-$(cd .. && pwd)/shared/data}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
