# convserve inference server, CPU: ONNX Runtime's CPU build, no PyTorch, no CUDA.
#
#   docker build -f deploy/docker/server.Dockerfile -t convserve-server:0.1.0 .
#   docker run -p 8001:8001 -p 8002:8002 -v "$PWD/model_repository:/models:ro" convserve-server:0.1.0
#
# gRPC (KServe V2 + Classify) on :8001, Prometheus metrics on :8002/metrics; the model
# repository (docs/model-repository.md) is mounted at /models.

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY scripts/install-deps.sh scripts/
COPY contract/ contract/
COPY service/ service/
# .[serving-cpu] with every version from constraints.txt: the CPU-only onnxruntime at the version
# the tests run (tests/deploy/test_image_installs.py replays this line and serves from it).
RUN bash scripts/install-deps.sh server

FROM python:3.11.11-slim-bookworm
# A fixed uid: Kubernetes' runAsNonRoot can verify it, and a fresh named volume mounted at
# /models takes this directory's owner.
RUN groupadd --system --gid 10001 convserve \
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
    CONVSERVE_PROVIDERS=cpu
USER 10001:10001
WORKDIR /home/convserve
EXPOSE 8001 8002
# Healthy iff the standard gRPC health service answers SERVING (every model loaded and warm,
# not draining); the start period covers loading and warming the models.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.tools.client", "health", "--address", "127.0.0.1:8001"]
# SIGTERM (Docker's default stop signal) drains in-flight requests before exiting.
ENTRYPOINT ["python", "-m", "service"]
