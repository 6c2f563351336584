# The GPU image: every stage that runs on a GPU node (distill, prune, quantize, GPU
# evaluation). CUDA comes from torch's own wheels (PyPI's torch 2.13.0 is the CUDA 13
# build; its nvidia-* wheels hold the libraries), so the runtime base needs only the CUDA
# user-space the NVIDIA container toolkit expects; the build base's nvcc 13.0 matches
# torch's CUDA major, which DeepSpeed requires to compile its ops.
# Build from the repository root: images/build.sh cuda (docker or buildah; see images/Makefile).
# CUDA_DEVEL/CUDA_RUNTIME: Ubuntu-or-Debian bases; PYTHON: the interpreter package they offer
# (a local Debian 12 base where registries cannot be pulled: images/build.sh --local-base).
ARG CUDA_DEVEL=nvidia/cuda:13.0.0-devel-ubuntu24.04
ARG CUDA_RUNTIME=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# --- build: a virtualenv with llmpress[gpu]; DeepSpeed's ops need nvcc to compile ---
FROM ${CUDA_DEVEL} AS build
ARG DEBIAN_FRONTEND=noninteractive
ARG PYTHON=python3.12
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base image is pinned by tag; its packages take security updates, so the apt
# packages are not pinned (images/.hadolint.yaml says so for DL3008).
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${PYTHON}" "${PYTHON}-venv" "${PYTHON}-dev" build-essential ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN "${PYTHON}" -m venv /opt/llmpress
ENV PATH=/opt/llmpress/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Pre-compile the fused Adam and CPU Adam ops: a pod must not need nvcc at run time.
# (0 skips an op: only for a build base without nvcc; the image then JIT-compiles it.)
ARG DS_BUILD_FUSED_ADAM=1
ARG DS_BUILD_CPU_ADAM=1
# A build host has no GPU: without this DeepSpeed detects the 'cpu' accelerator and builds
# its ops for that (seen in the local build: accelerator_name='cpu', fused_adam skipped).
ARG DS_ACCELERATOR=cuda
ENV TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0"
# Every package from the hash-pinned locks (images/lock.sh): first pip, the build backend
# and what DeepSpeed's setup.py compiles against (torch), then the rest without build
# isolation, so that DeepSpeed builds its ops against that torch and nothing unhashed enters.
COPY images/cuda-build-lock.txt images/cuda-lock.txt /src/images/
RUN pip install --require-hashes -r images/cuda-build-lock.txt \
 && pip install --require-hashes --no-build-isolation -r images/cuda-lock.txt
COPY pyproject.toml README.md /src/
COPY pipelines /src/pipelines
COPY components /src/components
RUN pip install --no-deps --no-build-isolation /src \
 && pip check \
 && python -c "import llmpress, torch, transformers, llmcompressor, bitsandbytes, deepspeed"

# --- runtime: the virtualenv on the CUDA runtime base, as a non-root user ---
FROM ${CUDA_RUNTIME}
ARG DEBIAN_FRONTEND=noninteractive
ARG PYTHON=python3.12
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="llmpress-cuda" \
      org.opencontainers.image.description="llmpress stages on NVIDIA GPUs (torch, transformers, llm-compressor, bitsandbytes, DeepSpeed)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${PYTHON}" libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --uid 1000 --user-group --create-home --home-dir /home/llmpress --shell /usr/sbin/nologin llmpress
COPY --from=build /opt/llmpress /opt/llmpress
# HF and llmpress caches under HOME (or the scratch volume the recipe mounts); no
# credentials here: S3 and MLflow settings arrive as env from Secrets at run time.
ENV PATH=/opt/llmpress/bin:$PATH HOME=/home/llmpress LLMPRESS_CACHE=/home/llmpress/.cache/llmpress \
    HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/llmpress
ENTRYPOINT ["llmpress"]
CMD ["--help"]
