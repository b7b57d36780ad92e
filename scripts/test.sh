#!/usr/bin/env bash
# The whole test suite, from a fresh machine: services, install, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
exec python3 -m pytest "$@"
