"""What an app contract is: how to recognise its request and the adapter that serves it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from core.contract import RequestAdapter

Worker = Literal["infer", "splat"]


@dataclass(frozen=True)
class App:
    name: str
    """The name `python -m core.serve HANDLER --app NAME` will take (`studio`, `orbit`, ...)."""
    title: str
    worker: Worker
    """The worker whose jobs the app sends."""
    recognises: Callable[[dict[str, Any]], bool]
    """True for a job input in this app's shape (checked before any validation)."""
    adapter: RequestAdapter


def without(source: dict[str, Any], *names: str) -> dict[str, Any]:
    """A copy of `source` without `names` (the app's own fields, once translated)."""
    return {key: value for key, value in source.items() if key not in names}
