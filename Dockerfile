# syntax=docker/dockerfile:1.7
# Two images from one file:
#   gateway: slim CPU image with the FastAPI gateway (in-process CPU worker, or a front for Triton workers)
#     docker build --target gateway -t ponder-gateway .
#   worker:  CUDA runtime image running `ponder worker --triton` (NVIDIA Triton via nvidia-pytriton)
#     docker build --target worker -t ponder-worker .
# Both run as an unprivileged user and carry a HEALTHCHECK. Models are mounted at /models.

ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS gateway
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PONDER_MODELS_DIR=/models MALLOC_MMAP_THRESHOLD_=131072
RUN useradd --create-home --uid 10001 ponder
WORKDIR /opt/ponder
# torch first from the CPU index, so the project never pulls a CUDA build into the slim image
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY export ./export
COPY service ./service
RUN pip install . && mkdir -p /models && chown ponder /models
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["ponder", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS worker
ARG TORCH_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PONDER_MODELS_DIR=/models MALLOC_MMAP_THRESHOLD_=131072
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 ponder
# a venv keeps pip away from the system Python; its LIBDIR is what the Triton Python-backend stub loads
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/ponder
RUN pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY export ./export
COPY service ./service
RUN pip install ".[tensorrt]" || pip install . \
    && mkdir -p /models && chown ponder /models
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]
CMD ["ponder", "worker", "--triton", "--models", "/models", "--device", "cuda", "--host", "0.0.0.0", \
     "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"]
