# The rerank-worker image: the CLI as entrypoint (worker, submit, db upgrade, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 --user-group rerank \
    && mkdir /data \
    && chown rerank:rerank /data

# A writable working dir for the non-root user (RERANK_DATA_DIR defaults to ./.rerank).
WORKDIR /data
USER rerank

ENTRYPOINT ["rerank-worker"]
CMD ["--help"]
