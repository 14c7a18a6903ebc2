#!/usr/bin/env bash
# Creates the project's virtual environment ($1, default .venv), installs requirements.txt and
# builds inplace-abn. `make setup` runs it once; a stamp file makes later runs a no-op.
set -eu
VENV=${1:-.venv}
# The torch 2.14.1 wheels on our machines' disk are for CPython 3.11.
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
echo "setup: installing requirements.txt into $VENV (torch is several GB the first time)"
# This machine's pip configuration names local index folders that may not exist; its warnings
# about them are noise.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt \
    2> >(grep -v "is neither a file nor a directory" >&2)
# The project itself, editable: `cmal` imports from any folder and the cmal-* commands exist.
# setuptools is already in the environment, so the build needs nothing from the network.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
    2> >(grep -v "is neither a file nor a directory" >&2)
bash tools/build_inplace_abn.sh "$VENV/bin/python"
