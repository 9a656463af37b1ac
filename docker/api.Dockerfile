# The REST API. It validates specs (reads headers and configs, never merges): CPU PyTorch.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MERGE_SERVICE_DATA_DIR=/data
WORKDIR /app
# PyTorch's CPU wheels: PyPI's torch for Linux is the CUDA build, gigabytes of CUDA libraries
# this image never uses (a build arg: a mirror of that index, or empty for PyPI's)
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
COPY scripts/install-torch.sh scripts/
RUN python -m venv /opt/venv && TORCH_CPU_INDEX=$TORCH_CPU_INDEX scripts/install-torch.sh /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY merge_service merge_service
COPY api api
COPY workers workers
RUN pip install . && useradd --uid 1000 --create-home merge && mkdir /data && chown merge /data
USER merge
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s \
  CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["merge-service", "api", "--host", "0.0.0.0", "--port", "8000"]
