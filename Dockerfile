# One image for the worker, Flower and the one-shot migration in docker-compose.yml:
# the package installed once at build time (no `pip install` when a container starts).
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app
# Only what the package needs, so editing tests or docs does not rebuild this layer.
COPY pyproject.toml README.md LICENSE ./
COPY ironflow_celery ./ironflow_celery
# The pytest plugin the package declares (entry point pytest11): without it any pytest run
# in the image fails to load it.
COPY ironflow_celery_pytest ./ironflow_celery_pytest
RUN pip install . "flower>=2.0"

# The example workflows the compose file's worker runs (IRONFLOW_WORKFLOWS).
COPY examples ./examples
ENV PYTHONPATH=/app

# Celery warns when run as root; the containers need no privileges.
RUN useradd --system --no-create-home --shell /usr/sbin/nologin ironflow
USER ironflow

CMD ["celery", "-A", "ironflow_celery", "worker", "-l", "INFO", "-E"]
