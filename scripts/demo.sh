#!/usr/bin/env bash
# The README's main command: set up, train on MovieLens 100K, publish, serve, query, stop.
# Extra arguments go to scripts/demo.py (e.g. --users 1,2,3 or trainer overrides after --).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
