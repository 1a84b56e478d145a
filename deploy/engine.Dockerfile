# syntax=docker/dockerfile:1.7
# A vLLM engine for loragate on NVIDIA GPUs: the official vLLM OpenAI image, pinned, running as non-root.
# Build:  docker build -f deploy/engine.Dockerfile -t ghcr.io/loragate/engine:0.1.0 deploy
# Run with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True only where the gateway alone reaches the port
# (the Helm chart's NetworkPolicy, compose's internal network).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.26.0
FROM ${VLLM_IMAGE}
RUN groupadd --system --gid 2000 vllm \
    && useradd --system --uid 2000 --gid vllm --create-home --home-dir /home/vllm vllm \
    && mkdir -p /var/cache/huggingface /var/cache/loragate \
    && chown vllm:vllm /var/cache/huggingface /var/cache/loragate
ENV HF_HOME=/var/cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 2000:2000
WORKDIR /home/vllm
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
