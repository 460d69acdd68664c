# Build and push the image (with buildah if installed, else docker), run the tests and linters.
#
#   make cog-build                               # `cog build --separate-weights`, after script/cog-build-check
#   make cog-push MODEL=r8.im/USER/sdxl          # `cog push --separate-weights`, likewise
#   make image                                   # $(IMAGE):$(TAG) from the Dockerfile (CUDA torch)
#   make push REGISTRY=registry.example.com/ml   # builds, then pushes $(REGISTRY)/$(IMAGE):$(TAG)
#   make test                                    # the whole suite (what CI runs)
#   make test-fast                               # the engine tier only (no compile tier: pytest -m compile)
#   make try                                     # the API and playground on tiny random weights, no GPU
#   make test-half                               # every mode in half precision on the CPU
#   make lint
#   make gpu-check                               # measure a CUDA GPU, offline (bench/gpu_check.py; see below)
#
# Dockerfile build arguments go in BUILD_FLAGS, e.g. a CPU image:
#   make image BUILD_FLAGS="--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
# Behind a TLS-intercepting proxy, CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt hands pip its CA.

IMAGE ?= sdxl
TAG ?= $(shell git describe --always --dirty 2>/dev/null || echo latest)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
REGISTRY ?=
BUILDER ?= $(shell if command -v buildah >/dev/null 2>&1; then echo buildah; elif command -v docker >/dev/null 2>&1; then echo docker; fi)
BUILDAH ?= buildah
DOCKER ?= docker
BUILD_FLAGS ?=
PUSH_FLAGS ?=
CA_BUNDLE ?=
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python)

# Labels here rather than in the Dockerfile: a new commit then changes the image's config, no layer.
# The run.cog.* labels are the ones `cog build` adds (sdxl_cog/schema/image_labels.py): the Cog CLI and
# registries recognise a model image, and read its API, by them.
COG_LABELS_DIR = build/cog
BUILD_ARGS = --label org.opencontainers.image.version=$(TAG) --label org.opencontainers.image.revision=$(REVISION) \
	--label "run.cog.version=$$(cat $(COG_LABELS_DIR)/version)" \
	--label "run.cog.config=$$(cat $(COG_LABELS_DIR)/config.json)" \
	--label "run.cog.openapi_schema=$$(cat $(COG_LABELS_DIR)/openapi_schema.json)" \
	$(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(CA_BUNDLE))
comma := ,

.PHONY: image push test test-fast test-half lint cog-build cog-push try

ifneq ($(filter push,$(MAKECMDGOALS)),)
ifeq ($(REGISTRY),)
$(error usage: make push REGISTRY=host[:port][/namespace])
endif
endif

# buildah writes Docker format, not OCI: an OCI image config has no HEALTHCHECK.
image:
	@test -n "$(BUILDER)" || { echo "make image needs buildah or docker on PATH" >&2; exit 1; }
	$(PYTHON) -m sdxl_cog.schema.image_labels --out-dir $(COG_LABELS_DIR)
ifeq ($(BUILDER),buildah)
	$(BUILDAH) bud --layers --format docker $(BUILD_ARGS) $(BUILD_FLAGS) -t $(IMAGE):$(TAG) .
else
	DOCKER_BUILDKIT=1 $(DOCKER) build $(BUILD_ARGS) $(BUILD_FLAGS) -t $(IMAGE):$(TAG) .
endif

push: image
ifeq ($(BUILDER),buildah)
	$(BUILDAH) push $(PUSH_FLAGS) $(IMAGE):$(TAG) docker://$(REGISTRY)/$(IMAGE):$(TAG)
else
	$(DOCKER) tag $(IMAGE):$(TAG) $(REGISTRY)/$(IMAGE):$(TAG)
	$(DOCKER) push $(PUSH_FLAGS) $(REGISTRY)/$(IMAGE):$(TAG)
endif

# With the Cog CLI: weights in layers of their own, so a code change re-pushes only the code layers.
COG ?= cog
MODEL ?=
cog-build:
	script/cog-build-check
	$(COG) build --separate-weights -t $(IMAGE)

cog-push:
	@test -n "$(MODEL)" || { echo "usage: make cog-push MODEL=r8.im/USER/MODEL" >&2; exit 2; }
	script/cog-build-check
	$(COG) push $(MODEL) --separate-weights

test:
	$(PYTHON) -m pytest -q tests

# The engine tier only: no server subprocesses, no image builds, no compiling (the compile tier, pytest -m compile).
test-fast:
	$(PYTHON) -m pytest -q -m engine tests

# The API and the playground on tiny synthetic weights (noise images), no GPU and no download: script/try.
try:
	script/try

# Every mode in bfloat16 and float16 on the CPU, against float32 (part of `make test` too).
test-half:
	$(PYTHON) -m pytest -q -m half tests

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

SOAK_COUNT ?= 300
FUZZ_EXAMPLES ?= 100

.PHONY: soak fuzz gpu-check

# Sequential predictions through the real server on tiny synthetic weights: failures, worker RSS, files left behind.
soak:
	$(PYTHON) script/soak --count $(SOAK_COUNT)

# schemathesis against the server's own /openapi.json: no 5xx, invalid input refused, worker alive, READY at the end.
fuzz:
	$(PYTHON) script/fuzz --max-examples $(FUZZ_EXAMPLES)

# The server measured on a CUDA GPU with no network (bench/gpu_check.py; bench/README.md, section 9): the wheels
# script/gpu-wheels downloaded beforehand into WHEELS are installed into GPU_SITE, which comes first on PYTHONPATH,
# so the machine's own packages stay as they are. GPU_CHECK_FLAGS go to the script (e.g. --repeat 5).
WHEELS ?= .whl
GPU_SITE ?= /tmp/sdxl-gpu-site
GPU_CHECK_FLAGS ?=
GPU_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
gpu-check:
	@ls $(WHEELS)/*.whl >/dev/null 2>&1 || { echo "no wheels in $(WHEELS)/: run script/gpu-wheels $(WHEELS) where PyPI is reachable, and bring the folder along" >&2; exit 2; }
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_FLAGS)
