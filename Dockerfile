# Quotopia: one image for every service.
#
#   docker build -t quotopia:latest .
#   docker run --rm -p 50051:50051 quotopia:latest              # FT (the default command)
#   docker run --rm -p 8080:8080 -e FT_ADDR=HOST:50051 quotopia:latest core
#   docker run --rm -p 8082:8082 -e FT_ADDR=HOST:50051 -v quotopia-data:/data \
#       -e QUOTOPIA_DB=sqlite:////data/quotes.db quotopia:latest recorder
#
# compose.yaml runs all three from this image. Settings are the usual FT_* / CORE_* /
# RECORDER_* / QUOTOPIA_DB / LOG_LEVEL environment variables or flags (see
# `quotopia ft --help`).

# One pinned base for every stage: the venv built in `builder` points at this
# image's /usr/local/bin/python3.11, so the runtime must be the very same Python.
FROM python:3.11.17-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1


FROM base AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

# Build tooling (pip, hatchling), pinned, in its own venv: none of it reaches the
# runtime image.
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir \
        hatchling==1.33.0 \
        packaging==26.4 \
        pathspec==1.1.1 \
        pluggy==1.7.0 \
        tomlkit==0.15.2 \
        trove-classifiers==2026.9.21.13

# The runtime venv gets no pip or setuptools of its own: the build venv's pip
# installs into it (--python). Dependencies first, from the lock file alone, so
# editing the code does not invalidate this layer. Binary wheels only: the slim
# image has no compiler. (pip still byte-compiles; PYTHONDONTWRITEBYTECODE only
# stops the non-root runtime from trying to write .pyc files.)
COPY requirements.lock /tmp/requirements.lock
RUN python -m venv --without-pip /opt/venv \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir \
        --only-binary=:all: -r /tmp/requirements.lock

WORKDIR /src
COPY pyproject.toml README.md ./
COPY quotopia ./quotopia
# The project itself: a wheel, installed without dependencies (the lock has them all).
RUN /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /dist . \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-cache-dir --no-deps \
        /dist/quotopia-*.whl


FROM base AS runtime

# A fixed, unprivileged UID/GID, so volume permissions and policies can name it.
# /data is where compose mounts the history database's volume: a new named volume
# takes the owner of the image's directory, so the recorder (and Core: SQLite's WAL
# needs its readers to write too) can create quotes.db there.
RUN groupadd --system --gid 10001 quotopia \
 && useradd --system --uid 10001 --gid quotopia --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin quotopia \
 && mkdir /data \
 && chown 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv
COPY scripts/healthcheck.py /app/healthcheck.py

# The git commit the image was built from, for Core's GET /version
# (`docker build --build-arg QUOTOPIA_COMMIT=$(git rev-parse HEAD) .`).
ARG QUOTOPIA_COMMIT=""
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    QUOTOPIA_COMMIT=$QUOTOPIA_COMMIT

WORKDIR /app
USER 10001:10001

# FT's gRPC port, FT's metrics port, Core's HTTP port and the recorder's metrics
# port (FT_PORT, FT_METRICS_PORT, CORE_PORT and RECORDER_METRICS_PORT change them).
EXPOSE 50051 8081 8080 8082

# Every service drains on SIGTERM: FT ends open streams, Core finishes requests,
# the recorder writes what it has buffered.
STOPSIGNAL SIGTERM

# Probes whichever service this container runs: QUOTOPIA_SERVICE if set, else the
# command PID 1 runs (see scripts/healthcheck.py). Exit 0 healthy, 1 unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]

ENTRYPOINT ["quotopia"]
CMD ["ft"]
