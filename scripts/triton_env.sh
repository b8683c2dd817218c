#!/usr/bin/env bash
# Build/verify the local Triton toolchain under .triton/ (idempotent). See scripts/triton_setup.py.
#   bash scripts/triton_env.sh            # install what is missing
#   bash scripts/triton_env.sh --check    # verify only
#   source .triton/env.sh                 # afterwards: tritonserver / perf_analyzer on PATH
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$here/triton_setup.py" "$@"
