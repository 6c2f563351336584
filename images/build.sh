#!/usr/bin/env bash
# Build the llmpress images with Docker or buildah, from the repository root's files.
#   images/build.sh [--local-base] cpu|cuda|all
# BUILDER         docker (default when a Docker daemon answers) or buildah (OCI, --isolation chroot)
# IMAGE_REGISTRY  as images/Makefile (default ghcr.io/llmpress); VERSION: the tag (default: pyproject's version)
# --local-base    for machines that cannot pull public base images: debootstrap a Debian 12
#                 root (Debian's packages only) into $LOCAL_BASE_DIR, import it as
#                 localhost/llmpress-base:bookworm and build both images from it. The CPU
#                 torch wheel then comes from the folder $TORCH_CPU_WHEELS (bind-mounted, buildah only).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE_REGISTRY=${IMAGE_REGISTRY:-ghcr.io/llmpress}
VERSION=${VERSION:-$(python3 -c "import tomllib; print(tomllib.load(open('$ROOT/pyproject.toml', 'rb'))['project']['version'])")}
LOCAL_BASE=localhost/llmpress-base:bookworm
LOCAL_BASE_DIR=${LOCAL_BASE_DIR:-/tmp/llmpress-base-rootfs}
TORCH_CPU_WHEELS=${TORCH_CPU_WHEELS:-/opt/wheels}
if [[ -z ${BUILDER:-} ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then BUILDER=docker; else BUILDER=buildah; fi
fi
local_base=0
if [[ ${1:-} == --local-base ]]; then local_base=1; shift; fi
what=${1:?usage: images/build.sh [--local-base] cpu|cuda|all}
case $what in cpu | cuda | all) ;; *) echo "images/build.sh: unknown image '$what' (cpu, cuda or all)" >&2; exit 2 ;; esac

make_local_base() {
    # minbase + what the Dockerfiles expect of their bases: python (>= 3.11) with venv, CA certificates
    if ! buildah inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
        [[ -x $LOCAL_BASE_DIR/usr/bin/python3 ]] || debootstrap --variant=minbase \
            --include=python3,python3-venv,python-is-python3,ca-certificates,libgomp1 \
            bookworm "$LOCAL_BASE_DIR" http://deb.debian.org/debian
        local ctr
        ctr=$(buildah from scratch)
        buildah copy "$ctr" "$LOCAL_BASE_DIR" /
        # this machine's CA bundle: where registries are reached through a TLS-inspecting proxy
        buildah copy "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
        buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
        buildah commit --rm "$ctr" "$LOCAL_BASE"
    fi
}

build() { # build IMAGE_NAME DOCKERFILE EXTRA_ARGS...
    local tag=$IMAGE_REGISTRY/$1:$VERSION file=$ROOT/images/$2
    shift 2
    if [[ $BUILDER == docker ]]; then
        DOCKER_BUILDKIT=1 docker build --file "$file" --build-arg VERSION="$VERSION" --tag "$tag" "$@" "$ROOT"
    else
        buildah build --isolation chroot --layers --format docker --file "$file" --ignorefile "$file.dockerignore" \
            --build-arg VERSION="$VERSION" --tag "$tag" "$@" "$ROOT"
    fi
    echo "built $tag"
}

base_args_cpu=() base_args_cuda=()
if ((local_base)); then
    [[ $BUILDER == buildah ]] || { echo "images/build.sh: --local-base needs BUILDER=buildah" >&2; exit 2; }
    make_local_base
    base_args_cpu=(--pull=never --build-arg PYTHON=$LOCAL_BASE --build-arg PIP_EXTRA_INDEX_URL=
        --build-arg PIP_FIND_LINKS=/wheels --volume "$TORCH_CPU_WHEELS:/wheels:ro")
    # Debian 12's Python is 3.11. The local base has no CUDA toolkit (nvidia/cuda's devel image
    # cannot be pulled, Debian has no nvcc 13), so DeepSpeed's fused Adam, a CUDA op, is not
    # pre-built there; CPU Adam (C++) is.
    base_args_cuda=(--pull=never --build-arg CUDA_DEVEL=$LOCAL_BASE --build-arg CUDA_RUNTIME=$LOCAL_BASE
        --build-arg PYTHON=python3.11 --build-arg DS_BUILD_FUSED_ADAM=0 --build-arg DS_ACCELERATOR=cpu)
fi
[[ $what == cuda ]] || build llmpress-cpu cpu.Dockerfile "${base_args_cpu[@]}"
[[ $what == cpu ]] || build llmpress-cuda cuda.Dockerfile "${base_args_cuda[@]}"
