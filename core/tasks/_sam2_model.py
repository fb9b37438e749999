"""SAM 2 models: names -> the package's configs, loading through the registry, the download
from Meta's public checkpoints, the image predictors (one per recently seen image), and
mixed precision on CUDA.

One model built by `build_sam2_video_predictor` serves images and videos: `SAM2VideoPredictor`
is a `SAM2Base`, and `SAM2ImagePredictor` uses only the image encoder, prompt encoder and
mask decoder it shares with `build_sam2`'s model, so a size is held in memory once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import requests

from core.config import get_settings
from core.errors import InvalidInput
from core.models import (
    LoadedModel,
    check_model_name,
    download_whole,
    get_registry,
    worker_device,
)

log = logging.getLogger("worker.sam2")

DEFAULT_MODEL = "sam2.1_hiera_tiny.pt"
REGISTRY_KIND = "sam2"

# Checkpoint file -> the config shipped inside the `sam2` package (its own table's names).
CONFIGS: dict[str, str] = {
    "sam2.1_hiera_tiny.pt": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small.pt": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus.pt": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large.pt": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_tiny.pt": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small.pt": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus.pt": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large.pt": "configs/sam2/sam2_hiera_l.yaml",
}
# Short names a person types; they mean SAM 2.1.
ALIASES = {
    "tiny": "sam2.1_hiera_tiny.pt",
    "small": "sam2.1_hiera_small.pt",
    "base_plus": "sam2.1_hiera_base_plus.pt",
    "base-plus": "sam2.1_hiera_base_plus.pt",
    "b+": "sam2.1_hiera_base_plus.pt",
    "large": "sam2.1_hiera_large.pt",
}
# Where Meta publishes the checkpoints (the sam2 repository's download_ckpts.sh).
DOWNLOAD_BASES = {
    "sam2.1_": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/",
    "sam2_": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/",
}
IMAGE_CACHE_SIZE = 4
"""Image embeddings kept per model: clicking again on the same image skips the encoder."""
DOWNLOAD_CHUNK = 1024 * 1024


def checkpoint_name(name: str) -> str:
    """`facebook/sam2.1-hiera-tiny`, `sam2.1_hiera_tiny`, `tiny` -> `sam2.1_hiera_tiny.pt`."""
    name = name.strip()
    if name.lower() in ALIASES:
        return ALIASES[name.lower()]
    if name.startswith("facebook/"):
        name = name.removeprefix("facebook/").replace("-", "_")
    if not PurePosixPath(name).suffix:
        name = f"{name}.pt"
    check_model_name(name)
    return name


def config_for(name: str) -> str:
    """The package config of a checkpoint: its exact name, or a name that starts with one
    (a fine-tuned `sam2.1_hiera_small-kitchen.pt` is built as SAM 2.1 small)."""
    base = PurePosixPath(name).name
    if base in CONFIGS:
        return CONFIGS[base]
    for known, config in CONFIGS.items():
        stem = known.removesuffix(".pt")
        if base.startswith(stem) and base[len(stem) : len(stem) + 1] in ("_", "-", "."):
            return config
    choices = ", ".join(CONFIGS)
    raise InvalidInput(
        f"model {name!r} is not a SAM 2 checkpoint name this worker knows: use one of {choices} "
        "(or tiny, small, base_plus, large), or a fine-tuned file whose name starts with one"
    )


@dataclass
class Sam2Model:
    """The built predictor plus the image predictors of the last few images (by content)."""

    predictor: Any  # sam2.sam2_video_predictor.SAM2VideoPredictor
    config: str
    device: str
    fills_holes: bool
    images: OrderedDict[str, Any] = field(default_factory=OrderedDict)

    def image_predictor(self, rgb: np.ndarray) -> tuple[Any, bool]:
        """A predictor holding this image's embedding, and whether it was cached.

        Call with the model's lock held: the predictors share the model."""
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        key = image_key(rgb)
        cached = self.images.get(key)
        if cached is not None:
            self.images.move_to_end(key)
            return cached, True
        predictor = SAM2ImagePredictor(self.predictor)
        predictor.set_image(rgb)
        self.images[key] = predictor
        while len(self.images) > IMAGE_CACHE_SIZE:
            self.images.popitem(last=False)
        return predictor, False


def image_key(rgb: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(rgb).data)
    digest.update(str(rgb.shape).encode())
    return digest.hexdigest()


def _has_cuda_extension() -> bool:
    try:
        import sam2._C  # noqa: F401
    except ImportError:
        return False
    return True


def _build(path: Path, config: str, device: str) -> Sam2Model:
    import sam2  # noqa: F401  # initialises hydra's config search path to the package
    from sam2.build_sam import build_sam2_video_predictor

    predictor = build_sam2_video_predictor(config, str(path), device=device)
    fills_holes = _has_cuda_extension()
    if not fills_holes:
        # Filling small holes in video masks needs the package's CUDA extension (installed
        # without it, see README); SAM 2 would warn and skip it on every frame, so skip it
        # here once, openly.
        predictor.fill_hole_area = 0
        log.info("sam2: no CUDA extension (sam2._C); video masks are not hole-filled")
    return Sam2Model(predictor=predictor, config=config, device=device, fills_holes=fills_holes)


def _download(target: Path) -> None:
    """Meta's public checkpoint, whole or not at all; retried on connection errors and 5xx."""
    if target.name not in CONFIGS:
        raise FileNotFoundError(f"{target.name} is not one of Meta's published checkpoints")
    base = next(url for prefix, url in DOWNLOAD_BASES.items() if target.name.startswith(prefix))
    settings = get_settings()
    url = base + target.name
    timeout = (min(10.0, settings.fetch_timeout_s), settings.fetch_timeout_s)

    def fetch(partial: Path) -> None:
        with requests.get(url, stream=True, timeout=timeout) as response:
            if 400 <= response.status_code < 500:
                raise FileNotFoundError(f"{url} answered HTTP {response.status_code}")
            response.raise_for_status()  # 5xx: retried
            with partial.open("wb") as out:
                for chunk in response.iter_content(chunk_size=DOWNLOAD_CHUNK):
                    out.write(chunk)

    download_whole(target, fetch, what=url, permanent=(FileNotFoundError,))


def load_sam2(name: str, *, pin: bool = False) -> LoadedModel:
    """Build (once) the SAM 2 model of this checkpoint on the worker's device."""
    file_name = checkpoint_name(name)
    config = config_for(file_name)
    device = worker_device()
    return get_registry().get(
        REGISTRY_KIND,
        file_name,
        lambda path: _build(path, config, device),
        _download if PurePosixPath(file_name).name in CONFIGS else None,
        pin=pin,
    )


@contextlib.contextmanager
def inference_mode(device: str, half_precision: bool) -> Iterator[None]:
    """No autograd; on CUDA bfloat16 autocast as SAM 2 is meant to run (when allowed)."""
    import torch

    with torch.inference_mode():
        if half_precision and device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield


def warm_up(loaded: LoadedModel) -> None:
    """One prompt on a small image: the first job then skips allocator and kernel set-up.
    Its predictor is not cached (the image is no one's)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model: Sam2Model = loaded.model
    settings = get_settings()
    with loaded.lock, inference_mode(model.device, settings.half_precision):
        predictor = SAM2ImagePredictor(model.predictor)
        predictor.set_image(np.zeros((64, 64, 3), np.uint8))
        predictor.predict(
            point_coords=np.array([[32.0, 32.0]]), point_labels=np.array([1]), multimask_output=True
        )


def preload_sam2(name: str) -> LoadedModel:
    loaded = load_sam2(name, pin=True)
    warm_up(loaded)
    return loaded
