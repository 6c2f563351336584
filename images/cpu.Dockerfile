# The slim CPU image: import, report, CPU evaluation, and the chart's Jobs (register
# and submit). CPU-only torch keeps it a fraction of the CUDA image's size.
# Build from the repository root: images/build.sh cpu (docker or buildah; see images/Makefile).
# PYTHON: any Debian-based image with `python` >= 3.11 and its venv module; the public
# default for clusters, a local base where registries cannot be pulled (images/build.sh --local-base).
ARG PYTHON=python:3.11.14-slim-bookworm

# --- build: a virtualenv with llmpress and the CPU compression stack ---
FROM ${PYTHON} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Where pip finds the CPU torch wheel that images/cpu-lock.txt pins by hash: the PyTorch
# CPU index, or (PIP_FIND_LINKS) a folder holding that same file.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
RUN python -m venv /opt/llmpress
ENV PATH=/opt/llmpress/bin:$PATH
WORKDIR /src
# Every package comes from the hash-pinned locks (images/lock.sh): first the build backend,
# then the rest without build isolation, so that no sdist's build pulls an unhashed package.
COPY images/cpu-build-lock.txt images/cpu-lock.txt /src/images/
RUN pip install --require-hashes -r images/cpu-build-lock.txt \
 && pip install --require-hashes --no-build-isolation -r images/cpu-lock.txt
COPY pyproject.toml README.md /src/
COPY pipelines /src/pipelines
COPY components /src/components
RUN pip install --no-deps --no-build-isolation /src \
 && pip check \
 && python -c "import llmpress, torch, transformers, llmcompressor, kfp, psycopg2"

# --- runtime: the virtualenv on the slim base, as a non-root user ---
FROM ${PYTHON}
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="llmpress-cpu" \
      org.opencontainers.image.description="llmpress light steps and cluster Jobs (CPU torch, kfp, MLflow client)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/llmpress --shell /usr/sbin/nologin llmpress
COPY --from=build /opt/llmpress /opt/llmpress
ENV PATH=/opt/llmpress/bin:$PATH HOME=/home/llmpress LLMPRESS_CACHE=/home/llmpress/.cache/llmpress \
    HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/llmpress
ENTRYPOINT ["llmpress"]
CMD ["--help"]
