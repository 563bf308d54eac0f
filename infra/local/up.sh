#!/usr/bin/env bash
# infra/local/up.sh [options]: `services.py up` with the project's interpreter (see services.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYOCO_PYTHON:-$here/../../.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$here/services.py" up "$@"
