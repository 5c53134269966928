# shellcheck shell=bash
# Sourced by the venv scripts: `find_python 3.12` prints the path of a Python of exactly that minor version
# (python3.X on PATH, then pyenv's versions, then /usr/local/bin and /usr/bin), or returns 1 when there is none.
find_python() {
    local want="$1"
    local candidates=()
    if command -v "python$want" >/dev/null 2>&1; then candidates+=("$(command -v "python$want")"); fi
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    if command -v pyenv >/dev/null 2>&1; then pyenv_root="$(pyenv root)"; fi
    local d
    for d in "$pyenv_root"/versions/"$want"*/bin/"python$want" /usr/local/bin/"python$want" /usr/bin/"python$want"; do
        [ -x "$d" ] && candidates+=("$d")
    done
    local c
    for c in "${candidates[@]}"; do
        if "$c" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" >/dev/null 2>&1; then
            printf '%s\n' "$c"
            return 0
        fi
    done
    return 1
}
