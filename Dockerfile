# staticmoe for Hopper nodes (H100 / H800 / H200): an OpenAI-compatible MoE server with our sm_90a MoE kernel.
#
#   docker build -t staticmoe:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v /data/models/OLMoE-1B-7B:/models:ro staticmoe:0.1.0
#
# Stage "build" compiles the _C extension with the CUDA toolkit's nvcc the way CI does (scripts/setup.sh, run by
# .ci/run): the build requirements installed first, then `pip install --no-build-isolation` of this project, so
# scikit-build-core runs CMakeLists.txt, where the nvcc flags (-gencode=arch=compute_90a,code=sm_90a) live and
# nowhere else. Here the install is not editable (`--no-deps .`: the runtime stage keeps only the venv, not /src).
# Stage "runtime" keeps the virtual environment and drops the toolkit: the extension links the CUDA runtime
# statically and PyTorch's wheel brings its own CUDA libraries, so a base image suffices.
# Configuration is by STATICMOE_* environment variables (every `staticmoe serve` flag has one; see docs/deploy.md).

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_RELEASE=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_RELEASE} AS build

# PyTorch from PyPI: its Linux wheels are CUDA builds. 2.11 is the version the project's H100 runs use.
ARG TORCH_VERSION=2.11.0
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/cuda/bin:$PATH \
    CUDACXX=/usr/local/cuda/bin/nvcc
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's Python 3.12; the runtime stage installs the same package so the copied venv's interpreter link holds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /src

# Dependencies in their own layer (rebuilt only when pyproject.toml changes): the runtime dependencies and the
# build-system requirements, read from pyproject.toml so there is one list; cmake and ninja for scikit-build-core.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" > /tmp/requirements.txt \
 && pip install "torch==${TORCH_VERSION}" -r /tmp/requirements.txt cmake ninja

COPY CMakeLists.txt README.md ./
COPY csrc ./csrc
COPY model ./model
COPY service ./service

# The build falls back to the pure-torch path when nvcc is missing; here the extension must exist, so fail otherwise.
# -P keeps /src off sys.path: the import below must find the installed package, not the source tree.
RUN pip install --no-build-isolation --no-deps . \
 && python -P -c "from model.kernels import extension; assert extension.is_built(), extension.IMPORT_ERROR; print(extension.describe())"


FROM nvidia/cuda:${CUDA_VERSION}-base-${UBUNTU_RELEASE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 staticmoe \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin staticmoe

COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/lib/staticmoe/healthcheck.py

# The model is mounted read-only at /models (a Hugging Face checkpoint directory: config.json, *.safetensors,
# tokenizer files). Nothing is fetched from a hub at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    STATICMOE_MODEL=/models \
    STATICMOE_HOST=0.0.0.0 \
    STATICMOE_PORT=8000
VOLUME ["/models"]

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/staticmoe
EXPOSE 8000

# /health is 200 only once the model is loaded and the engine loop runs: allow a long start for large checkpoints.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15m --retries=3 \
    CMD ["python3", "/usr/local/lib/staticmoe/healthcheck.py"]

ENTRYPOINT ["staticmoe"]
CMD ["serve"]
