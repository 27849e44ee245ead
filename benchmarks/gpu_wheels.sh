#!/usr/bin/env bash
# Downloads into .whl/ the wheels benchmarks/gpu_check.py needs on the GPU machine (Python 3.12, PyTorch, Lightning,
# timm, tensorboard, huggingface_hub 1.3x … preinstalled; no network there): the packages that image lacks or holds at another version than
# our lock, at the lock's versions (requirements/*.txt; ftfy and wcwidth as resolved in .venv). Run here, from any
# directory; then see benchmarks/README.md for the command on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
locked() { grep -hiE "^($1)==" requirements/*.txt | sed 's/[ #].*//'; }
resolved() { .venv/bin/python -m pip freeze 2>/dev/null | grep -iE "^($1)=="; }
# shellcheck disable=SC2046 # one argument per pin
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  $(locked 'megatron-core|omegaconf|open_clip_torch|transformers|tokenizers|safetensors') \
  $(resolved 'ftfy|wcwidth')
du -sh .whl
