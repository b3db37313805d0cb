# convserve inference server, GPU: onnxruntime-gpu on an NVIDIA CUDA 12 + cuDNN 9 runtime.
#
#   docker build -f deploy/docker/server-gpu.Dockerfile -t convserve-server-gpu:0.1.0 .
#   docker run --gpus 1 -p 8001:8001 -p 8002:8002 -v "$PWD/model_repository:/models:ro" convserve-server-gpu:0.1.0
#
# onnxruntime-gpu 1.22.0 is built with CUDA 12.2 and links libcudart.so.12, libcublas(Lt).so.12,
# libcufft.so.11, libcurand.so.10, libnvrtc.so.12 and libcudnn.so.9: the CUDA 12.6 cudnn-runtime
# image has all of them. Newer onnxruntime-gpu releases link CUDA 13 and need a CUDA 13 base:
# change both together. The host needs an NVIDIA driver for CUDA 12.6 and the NVIDIA Container
# Toolkit. Without a GPU the server falls back to the CPU and says so in
# convserve_provider_fallback (alert ConvserveProviderFallback).

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# Ubuntu's python3 (3.10) follows the base image's security updates; pinning its Debian revision
# would break the build at every update, so the base image tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install pip==24.3.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
ARG ONNXRUNTIME_GPU_VERSION=1.22.0
RUN pip install "./[serving]" "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 convserve \
    && useradd --system --uid 10001 --gid convserve --create-home --home-dir /home/convserve convserve \
    && install -d -o convserve -g convserve /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONVSERVE_MODEL_REPOSITORY=/models \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_GRPC_PORT=8001 \
    CONVSERVE_METRICS_PORT=8002 \
    CONVSERVE_PROVIDERS=cuda
USER 10001:10001
WORKDIR /home/convserve
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-m", "service.client", "health", "--address", "127.0.0.1:8001"]
ENTRYPOINT ["python", "-m", "service"]
