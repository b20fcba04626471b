# syntax=docker/dockerfile:1.7
# Two images from one file:
#   gateway: slim CPU image with the FastAPI gateway (in-process CPU worker, or a front for Triton workers)
#     docker build --target gateway -t ponder-gateway .
#   worker:  NVIDIA's Triton image (build arg TRITON_IMAGE) running `ponder worker --triton --repo /models`
#     docker build --target worker -t ponder-worker .
# Both run as an unprivileged user and carry a HEALTHCHECK. Checkpoints (gateway) or the exported Triton
# repository (worker) are mounted at /models.

ARG TORCH_VERSION=2.13.0
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

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
COPY ponder ./ponder
RUN pip install . && mkdir -p /models && chown ponder /models
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["ponder", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------------------
# NVIDIA's Triton image (tritonserver with the onnxruntime, TensorRT and Python backends) serving a repository
# written by `ponder export triton-repo`, mounted at /models. The kernel-map step is a Python-backend model that
# imports this package, so the package gets a Python 3.11 venv and the Python-backend stub built for 3.11 (from
# nvidia-pytriton, whose server is the same release as the default image: Triton 2.51 = 24.10).
FROM ${TRITON_IMAGE} AS worker
ARG TORCH_VERSION
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 ponder
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/ponder
RUN pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY export ./export
COPY service ./service
COPY ponder ./ponder
# a link, not a copy: the stub finds its bundled libraries relative to its real location
RUN pip install . \
    && ln -sf /opt/venv/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
          /opt/tritonserver/backends/python/triton_python_backend_stub
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
CMD ["ponder", "worker", "--triton", "--repo", "/models", "--host", "0.0.0.0", \
     "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"]
