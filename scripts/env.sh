# Sourced by the other scripts: finds Python 3.12+ and makes (or reuses) the project's
# virtual environment at $FACTORY_VENV (default .venv), with the project installed in it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FACTORY_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"

pyenv_pythons() {  # pyenv's interpreters whose version matches $1, newest first
  command -v pyenv >/dev/null 2>&1 || return 0
  local v
  for v in $(pyenv versions --bare 2>/dev/null | grep -E "$1" | sort -rV); do
    echo "$(pyenv root)/versions/$v/bin/python3"
  done
}

find_python() {
  # 3.12 first, the version the project targets and tests on (pyenv keeps it off PATH here), then newer
  local candidate
  for candidate in python3.12 $(pyenv_pythons '^3[.]12[.]') "$HOME"/.pyenv/versions/3.12*/bin/python3 \
    python3.13 python3 $(pyenv_pythons '^3[.]1[3-9]') "$HOME"/.pyenv/versions/3.1[3-9]*/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)" || { echo "error: the Factory needs Python 3.12 or newer; install it (for example with pyenv) and retry" >&2; exit 2; }
  echo "creating $VENV with $("$PY" --version)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.factory-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "installing the Factory${EXTRAS:+ with [$EXTRAS]} into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
