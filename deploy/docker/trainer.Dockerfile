# convserve trainer: PyTorch training, ONNX export and report into a model repository.
#
#   docker build -f deploy/docker/trainer.Dockerfile -t convserve-trainer:0.1.0 .
#   docker run --rm -v "$PWD/model_repository:/models" convserve-trainer:0.1.0
#
# The default command trains the default CNN into /models/mnist_cnn unless a version exists
# there, so it is safe to run on every `docker compose up`. Pass other arguments to train
# something else: `docker run ... convserve-trainer:0.1.0 train --help`.

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
COPY training/ training/
# .[training] with every version from constraints.txt. PyPI's torch for Linux x86_64 is the CUDA
# build: it pulls several GB of nvidia-* wheels. For a CPU-only image (roughly 4 GB smaller):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ...
ARG TORCH_INDEX_URL=""
RUN bash scripts/install-deps.sh trainer

FROM python:3.11.11-slim-bookworm
RUN groupadd --system --gid 10001 convserve \
    && useradd --system --uid 10001 --gid convserve --create-home --home-dir /home/convserve convserve \
    && install -d -o convserve -g convserve /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg
USER 10001:10001
WORKDIR /home/convserve
# A one-shot job, not a service: nothing to probe.
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "training"]
CMD ["train", "--repository", "/models", "--model-name", "mnist_cnn", "--if-missing"]
