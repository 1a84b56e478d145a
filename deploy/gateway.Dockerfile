# syntax=docker/dockerfile:1.7
# The loragate gateway: OpenAI API, adapter routing, metrics, registry client. No vLLM, no training stack.
# Build from the repository root:  docker build -f deploy/gateway.Dockerfile -t ghcr.io/loragate/gateway:0.1.0 .
# The same image runs the engines' adapter-sync sidecar (python /opt/loragate/adapter_sync.py) and base-fetch init
# container (python /opt/loragate/base_fetch.py).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/gateway-requirements.txt /tmp/gateway-requirements.txt
RUN pip install -r /tmp/gateway-requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY loragate ./loragate
COPY gateway ./gateway
COPY adapters_registry ./adapters_registry
COPY training ./training
# --no-deps: the project's dependency list carries the training stack; the gateway image installs only the
# requirements above. The import check fails the build if the gateway ever needs more.
RUN pip install --no-deps . \
    && python -c "import gateway.app, gateway.cli, adapters_registry.s3, loragate.cli; loragate.cli.make_parser()"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 loragate \
    && useradd --system --uid 10001 --gid loragate --create-home --home-dir /home/loragate loragate \
    && mkdir -p /var/cache/loragate /registry \
    && chown loragate:loragate /var/cache/loragate /registry
COPY --from=build /opt/venv /opt/venv
COPY deploy/adapter_sync.py deploy/base_fetch.py /opt/loragate/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LORAGATE_HOST=0.0.0.0 \
    LORAGATE_PORT=8080 \
    LORAGATE_CACHE=/var/cache/loragate
USER 10001:10001
WORKDIR /home/loragate
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LORAGATE_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["loragate"]
CMD ["serve"]
