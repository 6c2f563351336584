#!/usr/bin/env bash
# Re-lock the images' Python packages: every package pinned with its sha256 hashes, so
# the Dockerfiles install them with `pip install --require-hashes`. Needs uv and PyPI.
#   images/cpu-lock.txt         llmpress[compress] + images/cpu.in, Python 3.11 x86_64 (the CPU image's base)
#   images/cuda-lock.txt        llmpress[gpu] + images/cuda.in, any Python >= 3.11 (Ubuntu 24.04's 3.12 on clusters)
#   images/cpu-build-lock.txt   setuptools and wheel (images/build-tools.in), at the versions of cpu-lock.txt
#   images/cuda-build-lock.txt  what DeepSpeed's build needs (images/cuda-build.in), at the versions of cuda-lock.txt
# images/constraints.txt holds the top-level pins both start from. The CPU torch is the
# PyTorch CPU index's wheel: TORCH_CPU_WHEELS names a folder or index page that has it.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
TORCH_CPU_WHEELS=${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}
export UV_CUSTOM_COMPILE_COMMAND="images/lock.sh"
"$UV" pip compile --quiet pyproject.toml images/cpu.in --extra compress -c images/constraints.txt \
    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --find-links "$TORCH_CPU_WHEELS" --no-emit-find-links -o images/cpu-lock.txt
"$UV" pip compile --quiet images/build-tools.in -c images/cpu-lock.txt \
    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o images/cpu-build-lock.txt
"$UV" pip compile --quiet pyproject.toml images/cuda.in --extra gpu -c images/constraints.txt \
    --generate-hashes --universal --python-version 3.11 -o images/cuda-lock.txt
"$UV" pip compile --quiet images/cuda-build.in -c images/cuda-lock.txt \
    --generate-hashes --universal --python-version 3.11 -o images/cuda-build-lock.txt
