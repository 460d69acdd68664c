# syntax=docker/dockerfile:1
# The image `cog build` makes, for machines without the Cog CLI: Cog's HTTP server (coglet) on port
# 5000 in /src, inputs validated against .cog/openapi_schema.json, weights baked under /src/weights.
#
#   script/download-weights                      # fills weights/ (11.5 GB)
#   docker build -t sdxl .
#   docker run --gpus all --shm-size=6g -p 5000:5000 sdxl
#
# Layers go from the least to the most often changed: base, system packages, Python packages,
# weights, code. A code change rebuilds and re-pushes only the last, small layers; the weights layer
# stays byte-identical, so registries and nodes that have it never fetch it again.

# Python 3.12 (cog.yaml's python_version). CUDA comes with torch's cu126 wheels (the nvidia-* packages)
# and the driver from the host, through the NVIDIA container toolkit (`--gpus all`). Any Debian or
# Ubuntu base works, e.g. nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04; the container test uses a bare
# Debian (script/build-base-rootfs) with the CPU wheel.
ARG BASE_IMAGE=python:3.12-slim-bookworm

# The code, gathered into one layer. Listed path by path: a plain `COPY . /src` would copy weights/
# a second time, and .dockerignore cannot leave it out of one COPY only (`cog build` needs it).
FROM scratch AS code
COPY cog.yaml predict.py requirements.txt /src/
COPY sdxl_cog/ /src/sdxl_cog/
COPY script/download-weights /src/script/download-weights
COPY deploy/ /src/deploy/

FROM ${BASE_IMAGE}
ARG BASE_IMAGE

# Metadata first: with buildah every instruction after the big Python layer costs a copy of it.
# The version and revision labels come from `make image` (--label), so a new commit changes the
# image's config but no layer.
LABEL org.opencontainers.image.title="sdxl-cog" \
      org.opencontainers.image.description="Stable Diffusion XL 1.0 (base + refiner) behind Cog's HTTP API on port 5000" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      run.cog.has_init="true"
ENV PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    COG_PREDICT_TYPE_STUB=predict.py:Predictor
WORKDIR /src
EXPOSE 5000
# Healthy only when READY or BUSY: /health-check is HTTP 200 in every state, so the probe reads its body.
# The start period covers setup() loading 11.5 GB of weights.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python", "/src/deploy/probe.py", "serving"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "cog.server.http"]

# 1. System packages, where the base lacks them: tini as PID 1 (forwards signals, reaps zombies, as
#    in Cog's images); the X11/GL libraries that OpenCV loads on import (invisible-watermark uses it);
#    Python with venv (CUDA images have none).
ARG SYSTEM_PACKAGES="tini libgl1 libglib2.0-0 libsm6 libxext6"
RUN set -eu; \
    missing=""; \
    for package in $SYSTEM_PACKAGES; do dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"; done; \
    python3 -c "import ensurepip, venv" 2>/dev/null || missing="$missing python3 python3-venv"; \
    if [ -n "$missing" ]; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing; \
      rm -rf /var/lib/apt/lists/*; \
    fi

# 2. Python packages into a venv whose python is first on PATH (coglet spawns its worker as the
#    `python` it finds there). torch first, from TORCH_INDEX_URL (empty: the default index);
#    TORCH_VERSION overrides the pin of requirements.txt (the CUDA build Cog has base images for).
#    FIND_LINKS names a directory of wheels mounted into the build (a local torch build, a CI wheel
#    cache) that pip looks in besides the indexes. A CA bundle for pip behind a TLS-intercepting
#    proxy can come in as the build secret "ca".
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=
ARG FIND_LINKS=
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca \
    set -eu; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ -n "$FIND_LINKS" ]; then export PIP_FIND_LINKS="$FIND_LINKS"; fi; \
    python3 -m venv "$VIRTUAL_ENV"; \
    torch="torch==${TORCH_VERSION:-$(sed -n 's/^torch==//p' /tmp/requirements.txt)}"; \
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch"; \
    grep -v '^torch==' /tmp/requirements.txt > /tmp/requirements-without-torch.txt; \
    pip install -r /tmp/requirements-without-torch.txt; \
    rm /tmp/requirements*.txt

# 3. Weights, in a layer of their own.
COPY weights/ /src/weights/

# 4. Code, then the schema coglet validates inputs against (what `cog build` generates).
COPY --from=code /src/ /src/
RUN python -m sdxl_cog.schema --out .cog/openapi_schema.json
