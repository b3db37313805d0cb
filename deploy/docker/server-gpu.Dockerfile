# convserve inference server, GPU: onnxruntime-gpu on an NVIDIA CUDA 12 + cuDNN 9 runtime.
#
#   docker build -f deploy/docker/server-gpu.Dockerfile -t convserve-server-gpu:0.1.0 .
#   docker run --gpus 1 -p 8001:8001 -p 8002:8002 -v "$PWD/model_repository:/models:ro" convserve-server-gpu:0.1.0
#
# Everything but onnxruntime-gpu comes from constraints.txt, as in the CPU image and the tests.
# onnxruntime-gpu is constraints-gpu-image.txt's 1.26.0, the last release built for CUDA 12
# (12.8, cuDNN 9; later ones link CUDA 13): it links libcudart.so.12, libcublas(Lt).so.12,
# libcufft.so.11, libcurand.so.10 and libcudnn.so.9, which this 12.8 cudnn-runtime base has.
# Ubuntu 24.04 because onnxruntime 1.24+ needs Python 3.11+ (24.04's python3 is 3.12; 22.04's is
# 3.10). Change the base and constraints-gpu-image.txt together. The host needs an NVIDIA driver
# for CUDA 12.8 (570+) and the NVIDIA Container Toolkit. Without a GPU the server falls back to
# the CPU and says so in convserve_provider_fallback (alert ConvserveProviderFallback).

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# Ubuntu's python3 (3.12) follows the base image's security updates; pinning its Debian revision
# would break the build at every update, so the base image tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md constraints.txt constraints-gpu-image.txt ./
COPY scripts/install-deps.sh scripts/
COPY contract/ contract/
COPY service/ service/
# .[serving] with every version from constraints.txt but onnxruntime-gpu's
# (tests/deploy/test_image_installs.py replays this line and serves from it).
RUN bash scripts/install-deps.sh server-gpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
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
    CMD ["python", "-m", "service.tools.client", "health", "--address", "127.0.0.1:8001"]
ENTRYPOINT ["python", "-m", "service"]
