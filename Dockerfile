# The order service image: one image for every role (worker, relay, shim,
# migrate); the command picks the role.  `docker compose up` runs them all.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORDERS_CONFIG=/app/config/config.yaml

WORKDIR /app

COPY setup.cfg setup.py README.md ./
COPY worker ./worker
COPY handlers ./handlers
COPY schema ./schema
RUN pip install . && rm -rf build *.egg-info

COPY config ./config

RUN useradd --system --uid 10001 --no-create-home --home-dir /app orders
USER orders

CMD ["orders", "worker"]
