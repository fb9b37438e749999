"""Finds the handler to serve: a module name (`handlers.splat`), a file (`handlers/splat.py`),
either with `:function` when the handler is not called `handler`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from core.serve.runner import install_sdk_progress_hook


class HandlerNotFound(Exception):
    pass


def load_handler(spec: str) -> tuple[Callable[[dict[str, Any]], Any], ModuleType]:
    """The handler function and its module. The SDK's progress hook goes in first, so a
    module that imports `progress_update` by name gets the server's."""
    install_sdk_progress_hook()
    target, _, attribute = spec.partition(":")
    attribute = attribute or "handler"
    if target.endswith(".py") or "/" in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise HandlerNotFound(f"{target}: no such file")
        name = f"serve_handler_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise HandlerNotFound(f"{target}: not a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise HandlerNotFound(f"{target}: {exc}") from exc
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise HandlerNotFound(f"{target} has no function {attribute!r} (the job handler)")
    return handler, module


def run_startup(module: ModuleType) -> None:
    """The module's `startup()` (preloading, as the worker does before taking jobs), if any."""
    startup = getattr(module, "startup", None)
    if callable(startup):
        startup()
