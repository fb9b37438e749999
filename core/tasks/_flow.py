"""Dense optical flow between two frames, for velocity: RAFT (torchvision `raft_small`) or
OpenCV's DIS, plus the robust per-box statistic the speeds are made of.

Both backends take BGR uint8 frames of one size and return an HxWx2 float32 field in pixels
of that size: `flow[y, x] = (dx, dy)` carries the point at (x, y) in the first frame to
(x + dx, y + dy) in the second.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import cv2
import numpy as np

from core.errors import InvalidInput
from core.media import longest_side_size
from core.models import LoadedModel, download_whole, get_registry, worker_device

log = logging.getLogger("worker.flow")

RAFT_WEIGHTS = "raft_small.pth"


@dataclass(frozen=True)
class RaftVariant:
    architecture: str
    """torchvision's builder: `raft_small` or `raft_large`."""
    url: str
    """torchvision's default weights for it; the file name ends in its sha256 prefix."""

    @property
    def sha256_prefix(self) -> str:
        return self.url.rsplit("-", 1)[1].removesuffix(".pth")


# The weights files WEIGHTS_DIR holds (plain state dicts), and torchvision's DEFAULT of each.
RAFT_VARIANTS = {
    "raft_small.pth": RaftVariant(
        "raft_small", "https://download.pytorch.org/models/raft_small_C_T_V2-01064c6d.pth"
    ),
    "raft_large.pth": RaftVariant(
        "raft_large", "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth"
    ),
}
RAFT_ALIASES = {
    "raft-small": "raft_small.pth",
    "raft_small": "raft_small.pth",
    "raft-large": "raft_large.pth",  # the Perception Concept Studio's name
    "raft_large": "raft_large.pth",
}


def raft_file(name: str) -> str:
    """A flow model's weights file: `raft-large` (or `raft_large`) -> `raft_large.pth`."""
    return RAFT_ALIASES.get(name.strip().lower(), name.strip())


RAFT_STRIDE = 8
"""RAFT's feature maps are 1/8 of the input: inputs are padded to multiples of 8."""


class FlowBackend(Protocol):
    name: str

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray: ...


def working_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(w, h) scaled so the long side is at most `max_side`; never enlarged."""
    return longest_side_size(width, height, max_side)


def resize_to(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (pixels.shape[1], pixels.shape[0]) == size:
        return pixels
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------
# DIS (OpenCV): no weights, about 0.1 s per 640x360 pair on one CPU core.


class DisFlow:
    """OpenCV's DIS with the `medium` preset, refined down to full resolution.

    The preset stops at half resolution (finest scale 1) and upsamples, which smears motion
    across object edges: a shape's median flow came out up to 6% slow on synthetic clips.
    Finest scale 0 measures it exactly there, for about 4x the time (still ~10x RAFT's speed
    on CPU). One instance per job: the OpenCV object keeps state and is not shared."""

    name = "dis"

    def __init__(self) -> None:
        self._dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self._dis.setFinestScale(0)

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        gray1 = cv2.cvtColor(first, cv2.COLOR_BGR2GRAY)
        gray2 = cv2.cvtColor(second, cv2.COLOR_BGR2GRAY)
        # OpenCV's stubs omit that an output array may be None (allocated by calc).
        return self._dis.calc(gray1, gray2, None)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------
# RAFT (torchvision raft_small): learned, far better on real footage, ~1 s per 640 px pair on
# two CPU cores, milliseconds on a GPU.


def raft_min_side(model: Any) -> int:
    """The smallest input side RAFT accepts: its correlation pyramid halves the 1/8 feature
    map (num_levels - 1) times and needs 2 cells left at the coarsest level."""
    levels = int(getattr(getattr(model, "corr_block", None), "num_levels", 4))
    return RAFT_STRIDE * 2 * 2 ** (levels - 1)


def pad_amounts(height: int, width: int, minimum: int = 0) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding to a multiple of 8 that is at least `minimum`,
    split evenly on both sides like RAFT's own InputPadder."""

    def target(size: int) -> int:
        return max(minimum, math.ceil(size / RAFT_STRIDE) * RAFT_STRIDE)

    pad_h, pad_w = target(height) - height, target(width) - width
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def to_raft_input(pixels: np.ndarray) -> Any:
    """BGR uint8 HxWx3 -> 1x3xHxW float RGB in [-1, 1], the scaling RAFT was trained on
    (torchvision's OpticalFlow transform: to [0, 1], then normalise with mean = std = 0.5)."""
    import torch

    rgb = np.ascontiguousarray(pixels[:, :, ::-1])
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()
    return tensor / 127.5 - 1.0


class RaftFlow:
    name = "raft"

    def __init__(self, loaded: LoadedModel, device: str, iterations: int = 12) -> None:
        self.loaded = loaded
        self.device = device
        self.iterations = iterations
        self.minimum = raft_min_side(loaded.model)

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        height, width = first.shape[:2]
        left, right, top, bottom = pad_amounts(height, width, self.minimum)
        batch = torch.cat([to_raft_input(first), to_raft_input(second)]).to(self.device)
        # Replicate, not zeros: a zero border is a strong edge the network would match.
        batch = F.pad(batch, (left, right, top, bottom), mode="replicate")
        with self.loaded.lock, torch.inference_mode():
            predictions = self.loaded.model(batch[:1], batch[1:], num_flow_updates=self.iterations)
        flow = predictions[-1][0, :, top : top + height, left : left + width]
        return flow.permute(1, 2, 0).float().cpu().numpy()


def _raft_loader(variant: RaftVariant) -> Any:
    def load(path: Path) -> Any:
        import torch
        from torchvision.models import optical_flow

        model = getattr(optical_flow, variant.architecture)(weights=None, progress=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model.load_state_dict(state)
        # fp32 even on CUDA: RAFT's iterative refinement is known to drift in half precision.
        return model.to(worker_device()).eval()

    return load


def _raft_downloader(variant: RaftVariant) -> Any:
    def download(target: Path) -> None:
        """torchvision's weights (a plain state dict, the format WEIGHTS_DIR holds), fetched
        with the worker's timeout and bounded retries and checked against their hash."""
        from core.config import get_settings
        from core.errors import FetchFailed
        from core.payload import fetch_url

        def fetch(partial: Path) -> None:
            data = fetch_url(variant.url, get_settings(), field=f"{variant.architecture} weights")
            digest = hashlib.sha256(data).hexdigest()
            if not digest.startswith(variant.sha256_prefix):
                raise ValueError(
                    f"{variant.url} has sha256 {digest[:8]}..., expected {variant.sha256_prefix}"
                )
            partial.write_bytes(data)

        download_whole(target, fetch, what=variant.url, permanent=(FetchFailed, ValueError))

    return download


def load_raft(name: str = RAFT_WEIGHTS, *, pin: bool = False) -> LoadedModel:
    """RAFT small or large by file name (or `raft-small` / `raft-large`)."""
    file_name = raft_file(name)
    variant = RAFT_VARIANTS.get(PurePosixPath(file_name).name)
    if variant is None:
        raise InvalidInput(
            f"flow model {name!r}: RAFT weights are raft_small.pth or raft_large.pth "
            "(torchvision state dicts), or raft-small / raft-large"
        )
    return get_registry().get(
        "torchvision-raft",
        file_name,
        _raft_loader(variant),
        _raft_downloader(variant) if file_name in RAFT_VARIANTS else None,
        pin=pin,
    )


# --------------------------------------------------------------------------------------------
# Per-box statistic


def core_region(
    box: tuple[float, float, float, float], width: int, height: int, fraction: float
) -> tuple[int, int, int, int]:
    """The centred sub-box with `fraction` of the box's width and height, as integer pixel
    bounds (x1, y1, x2, y2) inside the image, at least one pixel."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) * fraction / 2, (y2 - y1) * fraction / 2
    left = min(max(math.floor(cx - half_w), 0), width - 1)
    top = min(max(math.floor(cy - half_h), 0), height - 1)
    right = max(min(math.ceil(cx + half_w), width), left + 1)
    bottom = max(min(math.ceil(cy + half_h), height), top + 1)
    return left, top, right, bottom


def median_flow(flow: np.ndarray, region: tuple[int, int, int, int]) -> tuple[float, float]:
    """Component-wise median of the flow inside the region: robust to the background pixels
    and moving parts (limbs, wheels) a box also holds."""
    x1, y1, x2, y2 = region
    patch = flow[y1:y2, x1:x2].reshape(-1, 2)
    dx, dy = np.median(patch, axis=0)
    return float(dx), float(dy)


def background_flow(
    flow: np.ndarray, boxes: list[tuple[float, float, float, float]], margin: float = 0.1
) -> tuple[float, float] | None:
    """Median flow outside every box (each grown by `margin` of its size): the camera's own
    motion where the background is static. None when under 5% of the frame is background."""
    height, width = flow.shape[:2]
    outside = np.ones((height, width), bool)
    for x1, y1, x2, y2 in boxes:
        grow_x, grow_y = (x2 - x1) * margin, (y2 - y1) * margin
        left, top = max(int(x1 - grow_x), 0), max(int(y1 - grow_y), 0)
        right, bottom = min(math.ceil(x2 + grow_x), width), min(math.ceil(y2 + grow_y), height)
        outside[top:bottom, left:right] = False
    if outside.sum() < 0.05 * outside.size:
        return None
    dx, dy = np.median(flow[outside], axis=0)
    return float(dx), float(dy)
