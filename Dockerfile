# Infer worker (handlers/infer.py): YOLO detection, segmentation and pose, SAM 2/3, depth and
# velocity on images and videos, as a RunPod serverless worker. README: "Docker images".
#
#   docker build -t you/vision-infer:1.0 .
#   docker build --secret id=hf_token,env=HF_TOKEN -t you/vision-infer:1.0 .   # also bakes SAM 3
#
# Layers go from the slowest-changing to the fastest: system packages, PyTorch, the project's
# requirements, the weights, then the code. A change to core/ or handlers/ rebuilds only the
# last few COPY layers; it never reinstalls a package or downloads a weight again.

# CUDA's "base" flavour (the CUDA runtime and the driver requirement) is enough: PyTorch's wheels
# carry their own cuBLAS, cuDNN and friends, which the "runtime" flavour would duplicate (GBs).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Python from the base's distribution, in a virtualenv (distributions forbid pip in the system's).
# libgl1 and libglib2.0-0: OpenCV's full wheel, which Ultralytics pulls in, links them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "${VIRTUAL_ENV}"

# PyTorch first and on its own: its CUDA build comes from its own wheel index (default CUDA 12.8,
# which runs on hosts with 12.8+ drivers). The pins it leaves keep the next step from swapping it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip freeze | grep -iE '^(torch|torchvision)==' > "${VIRTUAL_ENV}/torch-constraints.txt"

COPY requirements.txt /opt/worker/requirements.txt
RUN pip install --no-cache-dir -c "${VIRTUAL_ENV}/torch-constraints.txt" \
        -r /opt/worker/requirements.txt

# SAM 2 is a source release: built against the torch above, without its optional CUDA extension
# (only the hole filling of video masks needs it).
RUN pip install --no-cache-dir -c "${VIRTUAL_ENV}/torch-constraints.txt" setuptools==80.9.0 wheel==0.45.1 \
    && SAM2_BUILD_CUDA=0 pip install --no-cache-dir --no-build-isolation \
        -c "${VIRTUAL_ENV}/torch-constraints.txt" sam2==1.1.0

# Weights: baked here so that the worker never downloads at start. WEIGHTS picks them
# (scripts/fetch_weights.py: names and groups; `default` is YOLO11n detect/seg/pose, SAM 2.1
# tiny, Depth Anything V2 Small and RAFT small, and the Perception Concept Studio's YOLO26n
# detect/seg/pose, Depth Anything V1 Small and RAFT large, plus SAM 3 when the build secret
# `hf_token` gives access). WEIGHTS_FROM_CONTEXT=1 copies them from the build context's weights/.
ENV WEIGHTS_DIR=/opt/weights
ARG WEIGHTS=default
ARG WEIGHTS_FROM_CONTEXT=""
COPY scripts/fetch_weights.py /opt/worker/scripts/fetch_weights.py
RUN --mount=type=bind,source=weights,target=/tmp/context-weights \
    --mount=type=secret,id=hf_token \
    set -- --dest "${WEIGHTS_DIR}" --models "${WEIGHTS}"; \
    if [ -n "${WEIGHTS_FROM_CONTEXT}" ]; then set -- "$@" --from-dir /tmp/context-weights; fi; \
    python /opt/worker/scripts/fetch_weights.py "$@"

# The worker's defaults in this image: baked weights only, and those preloaded before the first
# job (the worker exits with status 3 if one fails). Both can be overridden on the endpoint.
ARG PRELOAD_MODELS=object-detection,image-segmentation,pose-estimation,sam2-segmentation,depth-estimation,velocity-estimation
ENV PRELOAD_MODELS=${PRELOAD_MODELS} \
    ALLOW_MODEL_DOWNLOADS=false \
    VOLUME_WEIGHTS_DIR=/runpod-volume/weights

WORKDIR /opt/worker
COPY test_input.json ./
COPY handlers/ handlers/
COPY core/ core/

LABEL org.opencontainers.image.title="vision-infer" \
      org.opencontainers.image.description="RunPod serverless worker: perception on images and videos"
CMD ["python", "-u", "handlers/infer.py"]
