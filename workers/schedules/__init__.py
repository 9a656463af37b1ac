"""Scheduled merges of adapter collections (DESIGN.md section 6).

- `models`: the schedule, its collection and spec template, and the record of each run.
- `collections`: a collection (Hub collection, list of sources, local directory) resolved to
  adapters pinned to revisions.
- `store`: schedules and their runs in Redis, and their Celery beat entries (celery-redbeat).
- `ticks`: what one tick does: resolve, skip when unchanged, else submit a pinned job.
- `beat`: the scheduler process (`merge-service scheduler`), Celery beat on redbeat.
"""
