# One image for every role of the relay: `db init`, `worker`, `serve`, and the demo's
# `receive` and `demo --receiver`. The command picks the role (docker-compose.yml).

# Build stage: compilers for any dependency without a wheel for this platform.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /app
# The dependencies first, in a layer of their own that a change of the code leaves alone;
# pinned: each at the version constraints.txt names.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        -c constraints.txt -r /tmp/requirements.txt
COPY . .
# The relay as a wheel: its packages, with schema.sql, its upgrade steps and the ops page
# inside them.
RUN /opt/venv/bin/pip wheel --no-cache-dir --disable-pip-version-check --no-deps \
        --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin postback
# The dependencies, unchanged by a change of the code; then the relay, from its wheel: no
# source tree, nothing editable.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /wheels /wheels
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index \
        /wheels/*.whl \
    && rm -r /wheels
# The venv, and the code installed in it, stay root's: the relay cannot rewrite its own code.
# POSTBACK_DATA_DIR is only for the embedded servers, which a container with both
# URLs set never starts; it points somewhere writable all the same.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    POSTBACK_DATA_DIR=/tmp/postback
USER postback
EXPOSE 8080
# Exec form: `postback` is the process that gets SIGTERM (through the init compose adds),
# so a worker stops taking jobs and lets those in flight finish.
ENTRYPOINT ["postback"]
CMD ["worker"]
