# Three images from one file (no `# syntax=` line: the builder's own Dockerfile frontend is used, nothing is pulled
# for it). Base images are build args, so the same file builds from a local base where no registry is reachable
# (deploy/check_images.sh does that with a Debian base made by mmdebstrap).
#   gateway       slim gateway in front of Triton workers: HTTP, decoding, voxelising, tritonclient.
#                 No torch, spconv or Triton server (`pip install ponder-serve[gateway]`).
#                   docker build --target gateway -t ponder-gateway .
#   gateway-full  the gateway with the in-process CPU worker (torch CPU build + spconv) and the bundled default
#                 model (`ponder-serve[model]`).
#                   docker build --target gateway-full -t ponder-gateway-full .
#   worker        NVIDIA's Triton image serving a repository written by `ponder export triton-repo`, with this
#                 package for the repository's kernel-map step (a Python-backend model that imports torch).
#                   docker build --target worker -t ponder-worker .
#   worker-cpu    stand-in of `worker` for CPU machines without NVIDIA's image (CI, this project's compose check):
#                 Debian/python base + the CPU build of torch + nvidia-pytriton, whose tritonserver has only the
#                 Python backend, so it serves `--kind python-torch` / `python-onnxruntime` repositories, mounted
#                 at /models (else the default model's, python-torch, exported at build time).
#                   docker build --target worker-cpu -t ponder-worker-cpu .
# Every image runs as uid 10001. Dependencies are installed in a layer before the code, so a code change
# rebuilds only the last, small layer (`pip install --no-deps .`). That layer's cache key is the requirement list
# (stage `requirements`), not pyproject.toml: editing a version, pytest settings or another extra reinstalls nothing.
#
# CUDA versions of the worker (all CUDA 12.6): Triton 24.10 = Triton server 2.51 on CUDA 12.6.2 with TensorRT
# 10.5 (Triton's own TensorRT backend runs the `--kind tensorrt` plans; no pip `tensorrt`); torch from the cu126
# index (TORCH_WORKER_INDEX_URL) for the kernel-map step; spconv-cu126 only to export checkpoints in the image
# (the served encoder is ONNX or TensorRT). The Python-backend stub for Python 3.11 comes from nvidia-pytriton 0.7, whose server is the same
# release (2.51). Change TRITON_IMAGE and TORCH_WORKER_INDEX_URL together.

# python:3.11.11-slim-bookworm, pinned by the digest public Dockerfiles pin for that tag.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------------------------------------------------
# The Python base of both gateways and the CPU worker: a venv (works the same on the official image and on Debian's python3).
FROM ${PYTHON_IMAGE} AS python-base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PONDER_PORT=8000 PONDER_MODELS_DIR=/models PONDER_EMPTY_MODELS_DIR=default MALLOC_MMAP_THRESHOLD_=131072
RUN python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 ponder \
    && mkdir -p /models && chown ponder /models
WORKDIR /opt/ponder

# The requirements of each image, read from pyproject.toml and copied into the images below by content (so
# the `worker` build uses PYTHON_IMAGE too, for this small stage only).
FROM python-base AS requirements
COPY pyproject.toml ./
COPY deploy/requirements.py deploy/
RUN mkdir /requirements \
    && for extras in gateway model worker; do python deploy/requirements.py "$extras" > "/requirements/$extras.txt"; done

# ---------------------------------------------------------------------------------------------------------
FROM python-base AS gateway
COPY --from=requirements /requirements/gateway.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY export ./export
COPY service ./service
COPY ponder ./ponder
RUN pip install --no-deps . && rm -rf build
USER 10001
EXPOSE 8000
# The gateway answers /readyz 200 only once its worker is reachable and has models; it listens on PONDER_PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PONDER_PORT', '8000'), timeout=4)"]
ENV PONDER_WORKER=triton
CMD ["ponder", "serve", "--host", "0.0.0.0"]

# ---------------------------------------------------------------------------------------------------------
FROM python-base AS gateway-full
ARG TORCH_VERSION
# The CPU build of torch from its own index first, so the requirements never pull a CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=requirements /requirements/model.txt /tmp/requirements.txt
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" && pip install -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY export ./export
COPY service ./service
COPY ponder ./ponder
RUN pip install --no-deps . && rm -rf build
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PONDER_PORT', '8000'), timeout=4)"]
ENV PONDER_WORKER=inprocess
CMD ["ponder", "serve", "--host", "0.0.0.0"]

# ---------------------------------------------------------------------------------------------------------
# NVIDIA's image (tritonserver with the onnxruntime, TensorRT and Python backends) serving the repository mounted
# at /models; without one it serves the default model's repository exported when the image was built.
FROM ${TRITON_IMAGE} AS worker
ARG TORCH_VERSION
ARG TORCH_WORKER_INDEX_URL=https://download.pytorch.org/whl/cu126
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's python3.11 packages are not pinned (DL3008): they follow the base image's release, which TRITON_IMAGE pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 ponder \
    && python3.11 -m venv /opt/venv
WORKDIR /opt/ponder
COPY --from=requirements /requirements/worker.txt /tmp/requirements.txt
RUN pip install --index-url "${TORCH_WORKER_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install "spconv-cu126==2.3.8" -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY export ./export
COPY service ./service
COPY ponder ./ponder
COPY deploy/worker-entrypoint.sh /usr/local/bin/ponder-worker
# The stub is linked, not copied: it finds its bundled libraries relative to its real location. The default
# model's repository (onnxruntime kind, GPU instances) is exported at build time so the image serves out of the box.
RUN pip install --no-deps . && rm -rf build \
    && ln -sf /opt/venv/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
          /opt/tritonserver/backends/python/triton_python_backend_stub \
    && ponder export triton-repo model/default_model --kind onnxruntime --device gpu -o /opt/ponder/default-repo
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
CMD ["ponder-worker"]

# ---------------------------------------------------------------------------------------------------------
# The CPU worker: same entrypoint and ports as `worker`, the tritonserver binary of nvidia-pytriton (Python backend
# only, hence `ponder export triton-repo --kind python-torch` or `python-onnxruntime` repositories). Like `worker`, it
# serves the default model's repository (python-torch kind, exported at build time; no spconv needed) when nothing is
# mounted at /models.
FROM python-base AS worker-cpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=requirements /requirements/worker.txt /tmp/requirements.txt
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" && pip install -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY export ./export
COPY service ./service
COPY ponder ./ponder
COPY deploy/worker-entrypoint.sh /usr/local/bin/ponder-worker
RUN pip install --no-deps . && rm -rf build \
    && ponder export triton-repo model/default_model --kind python-torch -o /opt/ponder/default-repo
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
CMD ["ponder-worker"]
