# The crealia server image. From the repository root:
#
#     docker build -t crealia:0.1.0 .
#     docker run --rm -p 3000:3000 -p 3001:3001 -e CREALIA_JWT_SECRET=... crealia:0.1.0
#
# Ports, data dir and Redis come from the environment (see deploy/README.md); flags given after
# the image name replace the CMD, e.g. `... crealia:0.1.0 crealia serve --host 0.0.0.0 --dev`.
# deploy/docker-compose.yml and deploy/k8s/ run this image as a cluster on PostgreSQL and Redis.

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# An unprivileged user with a numeric id, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 crealia \
    && useradd --system --uid 10001 --gid crealia --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin crealia \
    && mkdir -p /data \
    && chown crealia:crealia /data \
    && chmod 0700 /data

# Only what `pip install .` needs (.dockerignore lets nothing else in); the checkout is removed
# once the package and its dependencies are installed.
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY crealia ./crealia
RUN pip install --no-cache-dir --disable-pip-version-check . \
    && cd / \
    && rm -rf /src

# The server reads these (crealia/_config.py); flags win over them.
ENV CREALIA_DATA_DIR=/data \
    PORT=3000 \
    WS_PORT=3001

# SQLite store (embedded mode), node-local state and, without CREALIA_JWT_SECRET, the generated
# token secret. Owned by the crealia user, mode 0700.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

# HTTP (REST, dashboards, /metrics, /healthz, /readyz, WebSocket through hypercorn) and the
# fast-path WebSocket.
EXPOSE 3000 3001

# SIGTERM: stop accepting, close every socket with 1001, flush the store, exit 0 within 10 s.
STOPSIGNAL SIGTERM

# /healthz answers 200 while the process lives (no curl in the image: Python's urllib).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '3000') + '/healthz', timeout=4).close()"]

CMD ["crealia", "serve", "--host", "0.0.0.0"]
