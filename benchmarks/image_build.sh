#!/usr/bin/env bash
# Build the images the way this project's machines can (buildah, local Debian base) and print
# a table: image, build wall seconds, size. docs/cluster.md and docs/benchmarks.md cite it.
#   benchmarks/image_build.sh [cpu|cuda|all]     (root; apt-get install buildah debootstrap)
# A build reuses buildah's layer cache: for a cold figure, remove the images first
# (buildah rmi --all). Logs: /tmp/llmpress-image-build-<image>.log.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}
images=(cpu cuda)
[[ $what == all ]] || images=("$what")
VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('$ROOT/pyproject.toml', 'rb'))['project']['version'])")
rows=()
for image in "${images[@]}"; do
    log=/tmp/llmpress-image-build-$image.log
    start=$(date +%s)
    if BUILDER=buildah "$ROOT/images/build.sh" --local-base "$image" >"$log" 2>&1; then status=built; else status="FAILED (see $log)"; fi
    seconds=$(($(date +%s) - start))
    size=$(buildah images --json "ghcr.io/llmpress/llmpress-$image:$VERSION" 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['size'])" || echo -)
    rows+=("$(printf '%-14s %-8s %10s  %s' "llmpress-$image" "$seconds" "$size" "$status")")
done
printf '%-14s %-8s %10s  %s\n' image "build s" size status
printf '%s\n' "${rows[@]}"
