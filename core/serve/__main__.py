"""`python -m core.serve HANDLER [--host H] [--port P] [--concurrency N] [--db PATH] [--app NAME]`

HANDLER is a module (`handlers.splat`), a file (`handlers/splat.py`), or either with
`:function`. The module's `startup()` runs first (the infer worker preloads its models there,
as it does before `runpod.serverless.start`); then uvicorn serves RunPod's endpoint routes.
Flags override the SERVE_* environment variables of the same names.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from core.apps import get_app
from core.serve.app import create_app
from core.serve.loader import HandlerNotFound, load_handler, run_startup
from core.serve.runner import Runner
from core.serve.settings import ServeSettings
from core.serve.store import JobStore

log = logging.getLogger("serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m core.serve",
        description="Serve a RunPod handler with RunPod's endpoint API (/run, /status, ...).",
    )
    parser.add_argument("handler", help="handlers.splat, handlers/infer.py, module:function")
    parser.add_argument("--host", help="bind address (SERVE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (SERVE_PORT, default 8000)")
    parser.add_argument("--concurrency", type=int, help="jobs at once (SERVE_CONCURRENCY)")
    parser.add_argument("--db", dest="db_path", help="SQLite job store (SERVE_DB_PATH)")
    parser.add_argument(
        "--app",
        help="also serve this app's old backend routes (SERVE_APP): "
        "studio (handlers.infer: POST /infer, GET /health), "
        "splatt (handlers.splat: /jobs, /jobs/{id}/status, /jobs/{id}/results/..., /health)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The workers' log format (core.worker.configure_logging), without importing the infer stack.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {k: v for k, v in vars(args).items() if k != "handler" and v is not None}
    settings = ServeSettings(**overrides)
    try:
        handler, module = load_handler(args.handler)
    except HandlerNotFound as exc:
        log.error("cannot serve %s: %s", args.handler, exc)
        sys.exit(2)
    contract = None
    if settings.app:
        try:
            contract = get_app(settings.app)
        except KeyError as exc:
            log.error("cannot serve --app %s: %s", settings.app, exc.args[0])
            sys.exit(2)
        if contract.routes is None:
            log.error("the %s app has no routes of its own to serve", contract.title)
            sys.exit(2)
    run_startup(module)  # may exit non-zero (a required model did not load), as the worker
    store = JobStore(settings.db_path)
    app = create_app(Runner(handler, store, settings), settings, contract)
    log.info(
        "serving %s%s on http://%s:%d (concurrency %d, jobs in %s%s)",
        args.handler,
        f" with the {contract.title} routes" if contract else "",
        settings.host,
        settings.port,
        settings.concurrency,
        settings.db_path,
        ", API key required" if settings.api_key else "",
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        log_config=None,  # keep the worker's logging format
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )


if __name__ == "__main__":
    main()
