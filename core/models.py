"""Model registry: weight resolution, loading once, one lock per model, preload at start.

Weights are looked up in order: WEIGHTS_DIR, the RunPod network volume, RunPod's cache of hub
models (for a model that comes from a hub repository), then the framework's own download
where ALLOW_MODEL_DOWNLOADS allows it. A model that cannot be found is `model_unavailable`,
naming every place that was tried. Loaded models are keyed by the file they came from, so
`./x.pt` and `x.pt` are one model.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from core.config import Settings, get_settings
from core.errors import InvalidInput, ModelUnavailable
from core.retry import backoff_s

log = logging.getLogger("worker.models")


def resolve_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda:0" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def worker_device() -> str:
    """The device this worker runs its models on (the DEVICE setting, resolved once)."""
    return resolve_device(get_settings().device)


# The exit status of a worker whose DEVICE cannot run (a preload failure is 3).
EXIT_NO_DEVICE = 4


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run models here, or None. Only CUDA devices can be missing."""
    if not device.startswith("cuda"):
        return None
    import torch

    index_text = device.partition(":")[2] or "0"
    if not index_text.isdigit():
        return f"DEVICE={device} is not a CUDA device name (cuda or cuda:N)"
    if not torch.cuda.is_available():
        return (
            f"DEVICE={device} but no usable CUDA GPU is present (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}, sees none: no GPU, no driver, "
            "or CUDA_VISIBLE_DEVICES hides it)"
        )
    count = torch.cuda.device_count()
    if int(index_text) >= count:
        return f"DEVICE={device} but only {count} CUDA GPU(s) are visible"
    return None


def require_usable_device() -> str:
    """The worker's device; exits with EXIT_NO_DEVICE and one clear log line when DEVICE
    asks for a GPU that is not there. Both workers call it at start: a worker that asked for
    CUDA must not quietly serve jobs on the CPU at a fraction of the speed (auto does that)."""
    device = worker_device()
    problem = device_problem(device)
    if problem:
        log.error(
            "%s; the worker will not start (set DEVICE=auto or DEVICE=cpu to run on the CPU)",
            problem,
        )
        sys.exit(EXIT_NO_DEVICE)
    return device


@dataclass
class LoadedModel:
    kind: str
    name: str
    path: Path
    model: Any
    load_ms: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    pinned: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "path": str(self.path),
            "load_ms": round(self.load_ms, 1),
            "preloaded": self.pinned,
        }


def check_model_name(name: str) -> PurePosixPath:
    """A model name is a file name, or a relative path inside the weights directories."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise InvalidInput(
            f"model {name!r} must be a file name (or a relative path) inside WEIGHTS_DIR"
        )
    return path


Downloader = Callable[[Path], None]
Loader = Callable[[Path], Any]


def download_whole(
    target: Path,
    fetch: Callable[[Path], Path | None],
    *,
    what: str,
    permanent: tuple[type[BaseException], ...] = (),
) -> None:
    """Weights into `target` whole or not at all, with the worker's bounded retries.

    `fetch(partial)` writes a file or folder at `partial` (beside the target, so the final
    rename stays on one file system) and returns what to move into place (default `partial`).
    Errors in `permanent` (no such file, no access, offline) are raised at once; any other
    is retried with `core.retry.backoff_s`, FETCH_RETRIES times. Nothing is left half-written
    under the real name, and no partial survives a failure.
    """
    attempts = get_settings().fetch_retries + 1
    partial = target.with_name(f"{target.name}.partial")
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s(attempt))
        _remove(partial)
        try:
            produced = fetch(partial) or partial
            Path(produced).replace(target)
            log.info("downloaded %s to %s", what, target)
            return
        except permanent:
            raise
        except Exception as exc:  # network and server errors: bounded retries
            if attempt + 1 == attempts:
                raise
            log.warning("download of %s failed (%s); retrying", what, exc)
        finally:
            _remove(partial)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class HubFile:
    """Where a model lives on a hub: the repository, and the file in it (None: the whole
    snapshot is the model's folder, as for a transformers `save_pretrained` model)."""

    repo: str
    filename: str | None = None


def hub_cache_path(cache_dir: Path, hub: HubFile) -> Path | None:
    """The model in a Hugging Face cache (`models--ORG--NAME/snapshots/<commit>/`), as RunPod's
    cached models lay it out: the snapshot `refs/main` names, else the newest one."""
    root = cache_dir / f"models--{hub.repo.replace('/', '--')}"
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = root / "refs" / "main"
    chosen = snapshots / ref.read_text().strip() if ref.is_file() else None
    if chosen is None or not chosen.is_dir():
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
        if not candidates:
            return None
        chosen = max(candidates, key=lambda p: p.stat().st_mtime)
    target = chosen / hub.filename if hub.filename else chosen
    return target if target.exists() else None


class ModelRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._models: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._aliases: dict[tuple[str, str], tuple[str, str]] = {}
        """(kind, name as asked) -> (kind, resolved file): each spelling finds the one model."""
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}

    def search_dirs(self) -> list[Path]:
        return [Path(self.settings.weights_dir), Path(self.settings.volume_weights_dir)]

    def resolve(
        self, name: str, download: Downloader | None = None, hub: HubFile | None = None
    ) -> Path:
        relative = check_model_name(name)
        tried = []
        for base in self.search_dirs():
            candidate = base / relative
            tried.append(str(candidate))
            if candidate.exists():
                return candidate
        if hub is not None:
            cache = Path(self.settings.hub_cache_dir)
            tried.append(f"{cache}/models--{hub.repo.replace('/', '--')}")
            cached = hub_cache_path(cache, hub)
            if cached is not None:
                return cached
        if download is None:
            reason = "this model has no download source"
        elif not self.settings.allow_model_downloads:
            reason = "downloads are off (ALLOW_MODEL_DOWNLOADS=false)"
        else:
            target = self._download_dir() / relative
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                download(target)
                if target.exists():
                    return target
                reason = "the download produced no file"
            except Exception as exc:  # any download failure is reported the same way
                reason = f"download failed ({type(exc).__name__}: {exc})"
        raise ModelUnavailable(
            f"model {name!r} not found; looked in {', '.join(tried)}; {reason}. Put the file "
            "in WEIGHTS_DIR (or the network volume's weights folder), or allow downloads",
            looked_in=tried,
        )

    def _download_dir(self) -> Path:
        weights_dir = Path(self.settings.weights_dir)
        try:
            weights_dir.mkdir(parents=True, exist_ok=True)
            if os.access(weights_dir, os.W_OK):
                return weights_dir
        except OSError:
            pass
        return Path.home() / ".cache" / "worker-weights"

    def get(
        self,
        kind: str,
        name: str,
        loader: Loader,
        download: Downloader | None = None,
        pin: bool = False,
        hub: HubFile | None = None,
    ) -> LoadedModel:
        asked = (kind, str(check_model_name(name)))
        loaded = self._cached(asked, pin)
        if loaded is not None:
            return loaded
        with self._loading_lock(asked):  # two jobs asking for one model load it once
            loaded = self._cached(asked, pin)
            if loaded is not None:
                return loaded
            path = self.resolve(name, download, hub)
            key = (kind, str(path.resolve()))
            with self._loading_lock(key):  # another spelling of the same file
                with self._lock:
                    loaded = self._models.get(key)
                    if loaded is not None:
                        self._aliases[asked] = key
                        loaded.pinned |= pin
                        return loaded
                loaded = self._load(kind, name, path, loader, pin)
                with self._lock:
                    self._models[key] = loaded
                    self._aliases[asked] = key
                    self._evict()
                return loaded

    def _cached(self, asked: tuple[str, str], pin: bool) -> LoadedModel | None:
        with self._lock:
            key = self._aliases.get(asked)
            loaded = self._models.get(key) if key else None
            if loaded is not None and key is not None:
                self._models.move_to_end(key)
                loaded.pinned |= pin
            return loaded

    def _loading_lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._lock:
            return self._loading.setdefault(key, threading.Lock())

    def _load(self, kind: str, name: str, path: Path, loader: Loader, pin: bool) -> LoadedModel:
        started = time.perf_counter()
        try:
            model = loader(path)
        except (InvalidInput, ModelUnavailable):
            raise
        except Exception as exc:
            log.exception("loading %s from %s failed", name, path)
            raise ModelUnavailable(
                f"model {name!r} at {path} could not be loaded as a {kind} model "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        loaded = LoadedModel(
            kind=kind,
            name=name,
            path=path,
            model=model,
            load_ms=(time.perf_counter() - started) * 1000,
            pinned=pin,
        )
        log.info("loaded %s model %s from %s in %.0f ms", kind, name, path, loaded.load_ms)
        return loaded

    def _evict(self) -> None:
        unpinned = [k for k, m in self._models.items() if not m.pinned]
        while len(self._models) > self.settings.max_loaded_models and unpinned:
            evicted = self._models.pop(unpinned.pop(0))
            log.info("unloaded %s model %s (MAX_LOADED_MODELS)", evicted.kind, evicted.name)

    def loaded(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m.describe() for m in self._models.values()]


_registry: ModelRegistry | None = None
_registry_lock = threading.Lock()


def get_registry() -> ModelRegistry:
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = ModelRegistry(get_settings())
        return _registry
