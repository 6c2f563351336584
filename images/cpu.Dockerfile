# The slim CPU image: import, report, CPU evaluation, and the chart's Jobs (register
# and submit). CPU-only torch keeps it a fraction of the CUDA image's size.
# Build from the repository root: make -C images build-cpu (or see images/Makefile).
ARG PYTHON=python:3.11.14-slim-bookworm

# --- build: a virtualenv with llmpress and the CPU compression stack ---
FROM ${PYTHON} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/llmpress
ENV PATH=/opt/llmpress/bin:$PATH
WORKDIR /src
COPY images/constraints.txt /src/images/constraints.txt
COPY pyproject.toml README.md /src/
COPY pipelines /src/pipelines
COPY components /src/components
# torch's CPU build comes from the PyTorch index; everything else from PyPI, pinned.
# psycopg2: the chart's MLflow server runs in this image, with a PostgreSQL store.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu \
 && pip install -c images/constraints.txt ".[compress]" psycopg2-binary \
 && python -c "import llmpress, torch, transformers, llmcompressor, kfp"

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
