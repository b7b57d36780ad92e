#!/usr/bin/env bash
# The whole test suite, from a fresh machine: services, install, lint and types, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# The dashboard's browser tests drive Debian's chromium (Playwright never downloads a browser).
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python3 -m ruff check worker tests scripts
python3 -m mypy worker
exec python3 -m pytest "$@"
