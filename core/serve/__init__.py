"""A local endpoint server that behaves like a RunPod serverless endpoint, for self-hosting
and frontend development: `python -m core.serve handlers.splat --port 8000`.

The outermost shell: it imports the workers (handlers, apps), never the other way round.
Modules: `settings` (SERVE_* environment), `store` (jobs in SQLite), `runner` (worker threads,
cancel, timeouts, webhooks), `app` (the FastAPI routes), `loader` (the handler by name). The
per-job signals it sets live below it, in `core/control.py`.
"""
