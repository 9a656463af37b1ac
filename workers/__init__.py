"""Celery workers: one task per job around `merge_service.engine.run_merge`, and the Redis job
store shared with the API."""
