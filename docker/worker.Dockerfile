# A worker: Celery around the merge library, on a CUDA PyTorch base. Without a GPU it serves
# the `cpu` queue only (MERGE_SERVICE_WORKER_QUEUES=auto).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MERGE_SERVICE_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY merge_service merge_service
COPY api api
COPY workers workers
# the base image's torch satisfies the project's torch requirement: pip keeps it
RUN pip install . && useradd --uid 1000 --create-home merge && mkdir /data && chown merge /data
USER merge
CMD ["merge-service", "worker"]
