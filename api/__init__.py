"""The REST API (FastAPI): validates, stores, enqueues and reads jobs; never runs a merge."""
