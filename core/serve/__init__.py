"""A local endpoint server that behaves like a RunPod serverless endpoint, for self-hosting
and frontend development: `python -m core.serve handlers.splat --port 8000`.

Modules: `settings` (SERVE_* environment), `store` (jobs in SQLite), `runner` (worker threads,
cancel, timeouts, webhooks), `app` (the FastAPI routes), `loader` (the handler by name),
`context` (per-job signals the job's code consults). This file imports none of them: core's
progress and splat modules import `core.serve.context` without pulling in the web stack.
"""
