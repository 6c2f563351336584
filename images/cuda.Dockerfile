# The GPU image: every stage that runs on a GPU node (distill, prune, quantize, GPU
# evaluation). CUDA comes from torch's own wheels (nvidia-* packages), so the runtime
# base needs only the CUDA user-space the NVIDIA container toolkit expects.
# Build from the repository root: make -C images build-cuda (or see images/Makefile).
ARG CUDA_DEVEL=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- build: a virtualenv with llmpress[gpu]; DeepSpeed's ops need nvcc to compile ---
FROM ${CUDA_DEVEL} AS build
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base image is pinned by tag; its Ubuntu packages take security updates, so the
# apt packages are not pinned (images/.hadolint.yaml says so for DL3008).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev build-essential ninja-build \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/llmpress
ENV PATH=/opt/llmpress/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY images/constraints.txt /src/images/constraints.txt
COPY pyproject.toml README.md /src/
COPY pipelines /src/pipelines
COPY components /src/components
# Pre-compile the fused Adam and CPU Adam ops: a pod must not need nvcc at run time.
ENV DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
RUN pip install -c images/constraints.txt torch==2.13.0 \
 && pip install -c images/constraints.txt ".[gpu]" \
 && python -c "import llmpress, torch, transformers, llmcompressor, bitsandbytes, deepspeed"

# --- runtime: the virtualenv on the CUDA runtime base, as a non-root user ---
FROM ${CUDA_RUNTIME}
ARG DEBIAN_FRONTEND=noninteractive
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="llmpress-cuda" \
      org.opencontainers.image.description="llmpress stages on NVIDIA GPUs (torch, transformers, llm-compressor, bitsandbytes, DeepSpeed)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 libgomp1 ca-certificates \
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
