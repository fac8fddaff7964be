# syntax=docker/dockerfile:1.7
# Needs BuildKit (the default since Docker 23) for the cache and bind mounts below.
#
#   docker build -t dbsidecar:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .

# One base for both stages, so wheels built in the builder match the runtime's
# Python ABI and glibc exactly. Pin it by digest in release builds
# (python:3.11-slim@sha256:...) for reproducible, auditable images.
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
# builder: the project wheel plus a wheel for every dependency, so the runtime
# stage installs offline (--no-index) and never sees build tooling.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /src

# Only what the build reads: tests/, bench/ and the rest stay out of the image
# (see .dockerignore), and unrelated edits don't invalidate this layer.
# README.md is the project's `readme` in pyproject.toml, so setuptools needs it.
COPY pyproject.toml README.md ./
COPY sidecar/ ./sidecar/
COPY client/ ./client/
COPY wire/ ./wire/
# Dev tooling (`dbsidecar dev`): part of the distribution, never run in the image.
COPY devstack/ ./devstack/

# All dependencies publish manylinux wheels for amd64 and arm64, so no compiler
# is installed here either. If a platform ever lacks one, add build-essential
# to this stage only; the runtime stage stays compiler-free regardless.
# With the `relay` extra the same image runs `dbsidecar relay` (the outbox relay), and
# with `tracing` it exports spans when tracing.otlp_endpoint is set.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels '.[relay,tracing]'

# ---------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""

LABEL org.opencontainers.image.title="dbsidecar" \
      org.opencontainers.image.description="PostgreSQL routing sidecar: one per pod, data API on loopback/Unix socket, ops on :9432" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

# No .pyc writes at run time (the root filesystem is read-only in Kubernetes;
# pip already compiled the bytecode at install), and logs leave unbuffered so
# nothing is lost when the container is killed.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1

# A named account (not just a bare UID) because libpq-style code such as
# asyncpg falls back to getpass.getuser(), which needs a passwd entry.
# /var/run/dbsidecar is where the Unix socket lives; in Kubernetes a shared
# emptyDir is mounted over it, for plain `docker run` it must be writable.
RUN groupadd --system --gid 65532 dbsidecar \
 && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin dbsidecar \
 && install -d -o root -g root -m 0755 /etc/dbsidecar \
 && install -d -o 65532 -g 65532 -m 0755 /var/run/dbsidecar

# Wheels come in through a bind mount, so they never land in a layer. pip,
# setuptools and wheel are removed afterwards: nothing imports them at run time
# (checked against the dependency set) and they are a steady source of scanner
# CVEs in an image that is never modified after build. The checks at the end
# fail the build, not the rollout, if the entry point is broken: the console
# script runs, and everything `dbsidecar run` imports (sidecar.cli loads the
# server, sidecar.app and sidecar.reload, only inside `run`) imports without
# the removed packages.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links=/wheels "$(echo /wheels/dbsidecar-*.whl)[relay,tracing]" \
 && pip uninstall --yes setuptools wheel pip \
 && python -c "import sidecar.app, sidecar.reload, sidecar.cli, sidecar.relay_nats, sidecar.relay_webhook, client, opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.http.trace_exporter" \
 && dbsidecar --version

# No HEALTHCHECK: Kubernetes ignores it and uses the startup/liveness/readiness
# probes on the ops port (/startupz, /livez, /readyz) declared in the Helm
# chart; a Docker healthcheck would only add a second, unused poller.

# Numeric, so runAsNonRoot can verify it without resolving names.
USER 65532:65532

# Only the ops port (probes, /metrics). The data API (127.0.0.1:7432 or the
# Unix socket) is loopback-only by design and reachable solely inside the pod.
EXPOSE 9432

# The Python process is PID 1 on purpose: it handles SIGTERM itself (readiness
# turns 503, in-flight requests drain, exit 0) and spawns no children, so an
# init such as tini would add nothing.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dbsidecar"]
# No config is baked in: mount one at /etc/dbsidecar/config.yaml (the Helm
# chart does), or run `run` without --config and set DBSIDECAR_* variables.
CMD ["run", "--config", "/etc/dbsidecar/config.yaml"]
