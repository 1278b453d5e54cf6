# lbsession: the balancer, an app server, or a scenario runner, chosen by the command.
#   docker build -t lbsession .
#   docker run --rm -p 8080:8080 lbsession lb --host 0.0.0.0 --upstream http://was1:8001
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# No setup.py: the optional compiled build of the hot modules needs a C compiler, which the slim image
# lacks, so the image runs them as pure Python (GET /status says which build runs).
COPY pyproject.toml README.md ./
COPY lbsession ./lbsession
COPY configs ./configs
RUN pip install '.[redis]' \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin lbsession

USER lbsession

# Each service names what "healthy" means for it (compose sets LBSESSION_HEALTH_URL);
# an app server's /healthz is the default, 503 while its session store is unreachable.
ENV LBSESSION_HEALTH_URL=http://127.0.0.1:8001/healthz
HEALTHCHECK --interval=5s --timeout=2s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['LBSESSION_HEALTH_URL'], timeout=2)"]

EXPOSE 8080 8081 8001
ENTRYPOINT ["lbsession"]
CMD ["--help"]
