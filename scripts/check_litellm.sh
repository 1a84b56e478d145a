#!/usr/bin/env bash
# litellm against a running gateway, in a virtualenv of its own (litellm pins many packages the project's venv must
# not take): chat, streamed chat, the Responses API and a tool call, by adapter name.
#   bash scripts/check_litellm.sh http://127.0.0.1:8000/v1 ADAPTER [TOOLS_MODEL]
# e.g. after `.venv/bin/loragate demo --keep-serving` (the URL and the adapter names are in its output). The tool call
# is reported `skip` where the engines run without a tool parser (the demo's); `loragate serve ... --tool-call-parser
# hermes --chat-template tests/fixtures/chatml_tools.jinja` gives the tiny model one.
set -euo pipefail
cd "$(dirname "$0")/.."
URL=${1:?gateway base URL, e.g. http://127.0.0.1:8000/v1}; MODEL=${2:?an adapter (or base) name}
VENV=${LITELLM_VENV:-.cache/litellm-venv}
if [ ! -x $VENV/bin/python ] || ! $VENV/bin/python -c 'import litellm' 2>/dev/null; then
  python3 -m venv $VENV
  $VENV/bin/pip install --quiet "litellm>=1.80,<2"
fi
LITELLM_LOCAL_MODEL_COST_MAP=True $VENV/bin/python scripts/check_litellm.py "$URL" "$MODEL" "${3:-$MODEL}"
