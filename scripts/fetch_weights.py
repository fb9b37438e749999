"""Bake model weights into a folder: download the selected models, or copy them from a folder.

The infer image runs this at build time (Dockerfile: build arguments WEIGHTS and
WEIGHTS_FROM_CONTEXT) so that the worker never downloads at start. It works by hand too, for
example to fill a RunPod network volume that several endpoints share:

    python scripts/fetch_weights.py --dest /runpod-volume/weights          # the defaults
    python scripts/fetch_weights.py --dest weights --models yolo11s.pt,sam2.1_hiera_large.pt
    python scripts/fetch_weights.py --dest /opt/weights --from-dir ./my-weights --models all
    HF_TOKEN=hf_... python scripts/fetch_weights.py --dest weights --models sam3.pt

`--models` is a comma-separated list of names, as the worker looks them up in WEIGHTS_DIR, and
groups: `default` (`ours` and `studio`), `ours` (YOLO11n detect, seg and pose, SAM 2.1 tiny,
Depth Anything V2 Small, RAFT small), `studio` (the Perception Concept Studio's: YOLO26n detect,
seg and pose, Depth Anything V1 Small, RAFT large), `orbit` (SAM 2 hiera large, the size
Orbit's backend ran), with SAM 3 in `default` and `studio` when a
Hugging Face token is given; `yolo`, `sam2` (the four SAM 2.1 sizes), `all` (the whole catalog;
with --from-dir, everything in that folder) and `none`.

Each model lands under its final name only once complete (written beside it, then renamed), and
`weights-manifest.json` records the bytes, sha256 and source of each.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("fetch_weights")

MANIFEST = "weights-manifest.json"
DEFAULT_TOKEN_FILE = Path("/run/secrets/hf_token")  # where a Docker build secret is mounted
T = TypeVar("T")


class SelectionError(ValueError):
    """The --models selection names something that cannot be baked (exit status 2)."""


class PermanentError(RuntimeError):
    """A failure that retrying cannot fix (gated repository, missing file): no retry."""


# Hugging Face errors that retrying cannot fix, by class name (the library is imported lazily).
_PERMANENT_HF_ERRORS = {
    "GatedRepoError",
    "RepositoryNotFoundError",
    "EntryNotFoundError",
    "RemoteEntryNotFoundError",
    "RevisionNotFoundError",
    "LocalTokenNotFoundError",
}


@dataclass(frozen=True)
class Source:
    """Where a model comes from when it is downloaded."""

    kind: str  # "ultralytics" | "hf_file" | "hf_snapshot" | "torchvision"
    repo: str = ""  # Hugging Face repo, or the torchvision module
    item: str = ""  # file in the repo, or the weights enum
    patterns: tuple[str, ...] = ()  # hf_snapshot: the files a save_pretrained folder needs
    gated: bool = False

    def describe(self) -> str:
        if self.kind == "ultralytics":
            return "Ultralytics release asset"
        if self.kind == "torchvision":
            return f"torchvision {self.repo}.{self.item}"
        return f"huggingface.co/{self.repo}" + (f" ({self.item})" if self.item else "")


CATALOG: dict[str, Source] = {
    "yolo11n.pt": Source("ultralytics"),
    "yolo11n-seg.pt": Source("ultralytics"),
    "yolo11n-pose.pt": Source("ultralytics"),
    # Meta's SAM 2.1 checkpoints, under the names Meta publishes them with.
    "sam2.1_hiera_tiny.pt": Source("hf_file", "facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_small.pt": Source(
        "hf_file", "facebook/sam2.1-hiera-small", "sam2.1_hiera_small.pt"
    ),
    "sam2.1_hiera_base_plus.pt": Source(
        "hf_file", "facebook/sam2.1-hiera-base-plus", "sam2.1_hiera_base_plus.pt"
    ),
    "sam2.1_hiera_large.pt": Source(
        "hf_file", "facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt"
    ),
    # SAM 2 (not 2.1) large: the size Orbit's backend ran (`sam2_hiera_large`).
    "sam2_hiera_large.pt": Source("hf_file", "facebook/sam2-hiera-large", "sam2_hiera_large.pt"),
    # A transformers save_pretrained folder: config, weights and the image processor's config.
    "depth-anything-v2-small": Source(
        "hf_snapshot",
        "depth-anything/Depth-Anything-V2-Small-hf",
        patterns=("*.json", "*.safetensors"),
    ),
    "raft_small.pth": Source(
        "torchvision", "torchvision.models.optical_flow", "Raft_Small_Weights"
    ),
    "sam3.pt": Source("hf_file", "facebook/sam3", "sam3.pt", gated=True),
    # The Perception Concept Studio's models, under the names its proxy sends.
    "yolo26n.pt": Source("ultralytics"),
    "yolo26n-seg.pt": Source("ultralytics"),
    "yolo26n-pose.pt": Source("ultralytics"),
    "depth-anything-small-hf": Source(  # Depth Anything V1 Small
        "hf_snapshot", "LiheYoung/depth-anything-small-hf", patterns=("*.json", "*.safetensors")
    ),
    "raft_large.pth": Source(
        "torchvision", "torchvision.models.optical_flow", "Raft_Large_Weights"
    ),
}
GATED = tuple(name for name, source in CATALOG.items() if source.gated)
OURS = (
    "yolo11n.pt",
    "yolo11n-seg.pt",
    "yolo11n-pose.pt",
    "sam2.1_hiera_tiny.pt",
    "depth-anything-v2-small",
    "raft_small.pth",
)
STUDIO = (  # and sam3.pt, gated: taken where a token (or the file) is available
    "yolo26n.pt",
    "yolo26n-seg.pt",
    "yolo26n-pose.pt",
    "depth-anything-small-hf",
    "raft_large.pth",
)
# Orbit's SAM 2 size (ORBIT_SAM2_MODEL); its depth comes from `ours`. Not in `default`: the
# 900 MB is only worth baking into an endpoint that serves Orbit.
ORBIT = ("sam2_hiera_large.pt",)
GROUPS: dict[str, tuple[str, ...]] = {
    "default": OURS + STUDIO,
    "ours": OURS,
    "studio": STUDIO,
    "orbit": ORBIT,
    "yolo": ("yolo11n.pt", "yolo11n-seg.pt", "yolo11n-pose.pt"),
    "sam2": tuple(name for name in CATALOG if name.startswith("sam2.1_")),
    "all": tuple(name for name in CATALOG if name not in GATED),
    "none": (),
}
# Groups that also take the gated models when they are available (a token, or the file).
GROUPS_WITH_GATED = {"default", "studio", "all"}


@dataclass(frozen=True)
class Wanted:
    name: str
    required: bool  # False: skipped with a log line when unavailable (SAM 3 without a token)


def is_ultralytics_asset(name: str) -> bool:
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    return name in GITHUB_ASSETS_NAMES


def check_name(name: str) -> str:
    """A name is one entry of WEIGHTS_DIR: a file or folder name, never a path."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or name == MANIFEST:
        raise SelectionError(f"{name!r} is not a model name (a file or folder in WEIGHTS_DIR)")
    return name


def local_entries(folder: Path) -> list[str]:
    """What `all` means with --from-dir: every model in the folder (no notes, no dotfiles)."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if not p.name.startswith((".", "README")) and p.name != MANIFEST
    )


def resolve_selection(
    spec: str,
    *,
    from_dir: Path | None = None,
    token_available: bool = False,
    known_asset: Callable[[str], bool] = is_ultralytics_asset,
) -> list[Wanted]:
    """`default,yolo11s.pt` -> the models to bake, in order, each once."""
    wanted: dict[str, Wanted] = {}

    def add(name: str, required: bool) -> None:
        if name not in wanted or (required and not wanted[name].required):
            wanted[name] = Wanted(name, required)

    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise SelectionError("no models selected; use `none` to bake nothing")
    for item in items:
        if item in GROUPS:
            if item == "all" and from_dir is not None:
                for name in local_entries(from_dir):
                    add(name, True)
                continue
            for name in GROUPS[item]:
                add(name, True)
            if item in GROUPS_WITH_GATED:
                for name in GATED:  # only where available; said so in the log otherwise
                    add(name, False)
            continue
        name = check_name(item)
        if from_dir is None and name not in CATALOG and not known_asset(name):
            raise SelectionError(
                f"unknown model {name!r}: not in the catalog ({', '.join(CATALOG)}) nor an "
                f"Ultralytics release asset; groups: {', '.join(GROUPS)}. To bake your own "
                "checkpoints, use --from-dir"
            )
        add(name, True)

    if from_dir is not None:
        missing = [
            w.name for w in wanted.values() if w.required and not (from_dir / w.name).exists()
        ]
        if missing:
            raise SelectionError(f"not in {from_dir}: {', '.join(missing)}")
    elif not token_available:
        gated = [
            w.name for w in wanted.values() if w.required and CATALOG.get(w.name, Source("")).gated
        ]
        if gated:
            raise SelectionError(
                f"{', '.join(gated)} comes from a gated Hugging Face repository: accept its "
                "licence on huggingface.co, then give a token (HF_TOKEN, --hf-token-file, or the "
                "build secret `hf_token`)"
            )
    return list(wanted.values())


def read_token(token_file: Path | None) -> str | None:
    if token_file is not None and token_file.is_file():
        token = token_file.read_text().strip()
        if token:
            return token
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def with_retries(fn: Callable[[], T], what: str, attempts: int = 3, backoff_s: float = 2.0) -> T:
    """Run `fn`, retrying transient failures with exponential backoff; a bounded number of tries."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            permanent = isinstance(exc, PermanentError | SelectionError) or (
                type(exc).__name__ in _PERMANENT_HF_ERRORS
            )
            if permanent or attempt == attempts:
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "%s failed (%s: %s); retry %d in %.0f s",
                what,
                type(exc).__name__,
                exc,
                attempt,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# Downloads. Each writes the model at `target` (a temporary path beside its final place).


def download_ultralytics(name: str, target: Path) -> None:
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    from ultralytics.utils.downloads import attempt_download_asset

    if not is_ultralytics_asset(name):
        raise PermanentError(f"{name} is not an Ultralytics release asset")
    # The asset's URL comes from the file name, so it is fetched under its own name; it may
    # also return a copy it already has (Ultralytics' own weights folder).
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        found = Path(attempt_download_asset(Path(scratch) / name))
        if not found.is_file():
            raise RuntimeError(f"Ultralytics did not download {name}")
        shutil.copy2(found, target)


def hf_hub() -> Any:
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError as exc:
        raise PermanentError(
            "downloads from Hugging Face need the huggingface_hub package: add it to "
            "requirements.txt (or pip install huggingface_hub)"
        ) from exc


def download_hf_file(source: Source, target: Path, token: str | None) -> None:
    hf_hub_download = hf_hub().hf_hub_download

    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        path = hf_hub_download(source.repo, source.item, local_dir=scratch, token=token)
        shutil.move(path, target)


def download_hf_snapshot(source: Source, target: Path, token: str | None) -> None:
    snapshot_download = hf_hub().snapshot_download

    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        snapshot_download(
            source.repo, local_dir=scratch, allow_patterns=list(source.patterns), token=token
        )
        shutil.rmtree(Path(scratch) / ".cache", ignore_errors=True)  # hub bookkeeping
        if not (Path(scratch) / "config.json").is_file():
            raise PermanentError(f"{source.repo} has no config.json: not a save_pretrained folder")
        shutil.copytree(scratch, target)


def download_torchvision(source: Source, target: Path) -> None:
    import torch

    weights = getattr(importlib.import_module(source.repo), source.item).DEFAULT
    with tempfile.TemporaryDirectory(dir=target.parent) as hub_dir:
        state = weights.get_state_dict(progress=False, check_hash=True, model_dir=hub_dir)
    torch.save(state, target)


def download(name: str, target: Path, token: str | None) -> None:
    source = CATALOG.get(name, Source("ultralytics"))
    if source.kind == "ultralytics":
        download_ultralytics(name, target)
    elif source.kind == "hf_file":
        download_hf_file(source, target, token)
    elif source.kind == "hf_snapshot":
        download_hf_snapshot(source, target, token)
    elif source.kind == "torchvision":
        download_torchvision(source, target)
    else:
        raise PermanentError(f"{name}: unknown source kind {source.kind}")


def copy_local(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


# Checks and the manifest.


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():  # a folder's digest covers names as well as contents
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def check_complete(name: str, path: Path) -> None:
    if size_of(path) == 0:
        raise PermanentError(f"{name}: got an empty {'folder' if path.is_dir() else 'file'}")


def read_manifest(dest: Path) -> dict[str, dict[str, object]]:
    try:
        return json.loads((dest / MANIFEST).read_text())["models"]
    except (OSError, ValueError, KeyError):
        return {}


def write_manifest(dest: Path, models: dict[str, dict[str, object]]) -> None:
    tmp = dest / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"models": dict(sorted(models.items()))}, indent=1) + "\n")
    os.replace(tmp, dest / MANIFEST)


def bake(
    wanted: list[Wanted],
    dest: Path,
    *,
    from_dir: Path | None = None,
    token: str | None = None,
    force: bool = False,
    attempts: int = 3,
) -> dict[str, dict[str, object]]:
    """Put every wanted model in `dest`; returns the manifest entries of this run."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(dest)
    baked: dict[str, dict[str, object]] = {}
    try:
        for item in wanted:
            name = item.name
            final = dest / name
            source = CATALOG.get(name, Source("ultralytics"))
            if from_dir is None and source.gated and token is None:
                log.info(
                    "skipping %s: %s is gated and no Hugging Face token was given",
                    name,
                    source.repo,
                )
                continue
            if from_dir is not None and not (from_dir / name).exists():
                log.info("skipping %s: not in %s", name, from_dir)  # only optional ones get here
                continue
            if final.exists() and not force:
                log.info("%s is already in %s", name, dest)
                entry = manifest.get(name) or {"source": "already present"}
                entry.update(bytes=size_of(final), sha256=sha256_of(final))
                baked[name] = manifest[name] = entry
                continue
            partial = dest / f".{name}.partial"
            _remove(partial)
            started = time.perf_counter()
            try:
                if from_dir is not None:
                    copy_local(from_dir / name, partial)
                    origin = f"copied from {from_dir / name}"
                else:
                    with_retries(lambda n=name, p=partial: download(n, p, token), name, attempts)
                    origin = source.describe()
                check_complete(name, partial)
                _remove(final)
                os.replace(partial, final)
            finally:
                _remove(partial)
            entry = {"source": origin, "bytes": size_of(final), "sha256": sha256_of(final)}
            baked[name] = manifest[name] = entry
            log.info(
                "baked %s (%.1f MB, %s) in %.1f s",
                name,
                entry["bytes"] / 1e6,  # type: ignore[operator]
                origin,
                time.perf_counter() - started,
            )
    finally:  # what was baked stays recorded, even when a later model fails
        write_manifest(dest, manifest)
    return baked


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def set_network_timeouts(timeout_s: float) -> None:
    """Every download here gets a timeout: urllib (torch.hub, Ultralytics) and Hugging Face."""
    socket.setdefaulttimeout(timeout_s)
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=Path(os.environ.get("WEIGHTS_DIR", "weights")))
    parser.add_argument("--models", default="default", help="names and groups, comma-separated")
    parser.add_argument("--from-dir", type=Path, help="copy the models from this folder instead")
    parser.add_argument(
        "--hf-token-file",
        type=Path,
        default=DEFAULT_TOKEN_FILE,
        help="file holding a Hugging Face token (default: the build secret; else $HF_TOKEN)",
    )
    parser.add_argument("--force", action="store_true", help="replace models already in --dest")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout, seconds")
    parser.add_argument("--attempts", type=int, default=3, help="tries per download (1..10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fetch_weights: %(message)s")

    if args.from_dir is not None and not args.from_dir.is_dir():
        log.error("--from-dir %s is not a folder", args.from_dir)
        return 2
    token = None if args.from_dir is not None else read_token(args.hf_token_file)
    try:
        wanted = resolve_selection(
            args.models, from_dir=args.from_dir, token_available=token is not None
        )
    except SelectionError as exc:
        log.error("%s", exc)
        return 2
    if not wanted:
        log.info("nothing to bake (--models %s)", args.models)
        args.dest.mkdir(parents=True, exist_ok=True)
        return 0
    set_network_timeouts(args.timeout)
    hf_sources = {"hf_file", "hf_snapshot"}
    if args.from_dir is None and any(
        CATALOG.get(w.name, Source("")).kind in hf_sources for w in wanted
    ):
        try:
            hf_hub()  # fail before the first download, not after the others
        except PermanentError as exc:
            log.error("%s", exc)
            return 1
    started = time.perf_counter()
    try:
        baked = bake(
            wanted,
            args.dest,
            from_dir=args.from_dir,
            token=token,
            force=args.force,
            attempts=max(1, min(args.attempts, 10)),
        )
    except Exception as exc:
        log.error("could not bake the weights: %s: %s", type(exc).__name__, exc)
        return 1
    total = sum(int(entry["bytes"]) for entry in baked.values())  # type: ignore[call-overload]
    log.info(
        "%d model(s), %.1f MB in %s (%.1f s): %s",
        len(baked),
        total / 1e6,
        args.dest,
        time.perf_counter() - started,
        ", ".join(baked) or "none",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
