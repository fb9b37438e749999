"""matte: a soft alpha per frame from the roto masks, written as RGBA PNGs.

Each binary mask becomes a trimap (eroded: sure foreground, dilated: the unknown band, the
rest: sure background). Two methods fill the band:

- `vitmatte`: ViTMatte (transformers `VitMatteForImageMatting`, a save_pretrained folder such
  as `vitmatte-small-composition-1k`, fetched from the hub when absent); MatAnyone is not on
  PyPI.
- `guided_filter`: the classical fallback, no weights: He et al.'s guided filter of the mask
  with the frame (grey) as guide, which pulls the edge onto the image's own edges and feathers
  it where colours blend. Named as such in the result.

`auto` (the default) uses ViTMatte when its weights load and says when it fell back.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from core.control import cancel_requested
from core.errors import Cancelled, ModelUnavailable
from core.models import HubFile, LoadedModel, download_whole, get_registry, worker_device

Progress = Callable[[float, str], None]
Method = Literal["auto", "vitmatte", "guided_filter"]
CANCELLED = "the job was cancelled (or ran past its execution timeout)"

MODEL_KIND = "transformers-matting"
DEFAULT_MODEL = "vitmatte-small-composition-1k"
HUB_REPOS = {
    "vitmatte-small-composition-1k": "hustvl/vitmatte-small-composition-1k",
    "vitmatte-base-composition-1k": "hustvl/vitmatte-base-composition-1k",
}
DOWNLOAD_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]
UNKNOWN = 128


@dataclass
class MatteModel:
    model: Any
    processor: Any
    device: str


def trimap(mask: np.ndarray, erode_px: int, dilate_px: int) -> np.ndarray:
    """uint8: 255 sure foreground (the mask eroded), 0 sure background (outside the mask
    dilated), 128 the unknown band between."""
    binary = mask.astype(np.uint8)
    out = np.zeros(binary.shape, np.uint8)
    if dilate_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1,) * 2)
        grown = cv2.dilate(binary, kernel)
    else:
        grown = binary
    if erode_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode_px + 1,) * 2)
        core = cv2.erode(binary, kernel)
    else:
        core = binary
    out[grown > 0] = UNKNOWN
    out[core > 0] = 255
    return out


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter (grey guide, float32 images in [0, 1])."""
    size = (2 * radius + 1, 2 * radius + 1)

    def mean(image: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(image, cv2.CV_32F, size, borderType=cv2.BORDER_REFLECT)

    mean_i, mean_p = mean(guide), mean(source)
    var_i = mean(guide * guide) - mean_i * mean_i
    cov_ip = mean(guide * source) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return mean(a) * guide + mean(b)


def guided_alpha(
    frame: np.ndarray,
    mask: np.ndarray,
    trimap_u8: np.ndarray,
    *,
    radius: int = 4,
    eps: float = 1e-3,
) -> np.ndarray:
    """float32 alpha in [0, 1]: the mask guided-filtered by the frame, inside the unknown
    band (the trimap's known regions kept)."""
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0
    filtered = guided_filter(grey, mask.astype(np.float32), radius, eps)
    return _keep_known(np.clip(filtered, 0.0, 1.0), trimap_u8)


def _keep_known(alpha: np.ndarray, trimap_u8: np.ndarray) -> np.ndarray:
    alpha = alpha.astype(np.float32)
    alpha[trimap_u8 == 255] = 1.0
    alpha[trimap_u8 == 0] = 0.0
    return alpha


# --------------------------------------------------------------------------------------------
# ViTMatte


def _load(path: Path) -> MatteModel:
    from transformers import VitMatteForImageMatting, VitMatteImageProcessor
    from transformers.utils import logging as hf_logging

    missing = [f for f in ("config.json", "preprocessor_config.json") if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise ModelUnavailable(
            f"{path} is not a transformers save_pretrained folder (missing "
            f"{', '.join(missing) or 'the folder'}); save ViTMatte and its image processor "
            "there with save_pretrained"
        )
    hf_logging.disable_progress_bar()
    device = worker_device()
    processor = VitMatteImageProcessor.from_pretrained(path, local_files_only=True)
    model: Any = VitMatteForImageMatting.from_pretrained(path, local_files_only=True)
    return MatteModel(model=model.to(device).eval(), processor=processor, device=device)


def _download(target: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from core.config import get_settings

    repo = HUB_REPOS[target.name]

    def fetch(partial: Path) -> None:
        snapshot_download(
            repo,
            local_dir=partial,
            allow_patterns=DOWNLOAD_FILES,
            etag_timeout=get_settings().fetch_timeout_s,
        )
        shutil.rmtree(partial / ".cache", ignore_errors=True)

    download_whole(target, fetch, what=repo, permanent=(RepositoryNotFoundError, GatedRepoError))


def load_matte(name: str = DEFAULT_MODEL, *, pin: bool = False) -> LoadedModel:
    """ViTMatte from WEIGHTS_DIR / the volume / the hub; `model_unavailable` when none."""
    download = _download if name in HUB_REPOS else None
    hub = HubFile(HUB_REPOS[name]) if name in HUB_REPOS else None
    return get_registry().get(MODEL_KIND, name, _load, download, pin=pin, hub=hub)


def vitmatte_alpha(loaded: LoadedModel, frame: np.ndarray, trimap_u8: np.ndarray) -> np.ndarray:
    """float32 alpha in [0, 1] at the frame's size, known regions kept from the trimap."""
    import torch

    matte: MatteModel = loaded.model
    rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    inputs = matte.processor(
        images=rgb, trimaps=trimap_u8, return_tensors="pt", input_data_format="channels_last"
    )
    pixel_values = inputs["pixel_values"].to(matte.device)
    with loaded.lock, torch.inference_mode():
        alphas = matte.model(pixel_values=pixel_values).alphas
    height, width = trimap_u8.shape
    alpha = alphas[0, 0, :height, :width].float().cpu().numpy()
    return _keep_known(np.clip(alpha, 0.0, 1.0), trimap_u8)


# --------------------------------------------------------------------------------------------
# The stage


@dataclass
class MatteResult:
    method: str
    """`vitmatte` or `guided_filter`."""
    files: list[Path]
    fallback_reason: str | None = None


def rgba_png(frame: np.ndarray, alpha: np.ndarray) -> bytes:
    """The frame with the alpha as its 4th channel (8-bit PNG, straight alpha)."""
    alpha_u8 = np.round(np.clip(alpha, 0.0, 1.0) * 255).astype(np.uint8)
    ok, buffer = cv2.imencode(".png", np.dstack([frame, alpha_u8]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def pick_method(method: Method, model: str) -> tuple[str, LoadedModel | None, str | None]:
    """(method used, the loaded model or None, why it fell back or None)."""
    if method == "guided_filter":
        return "guided_filter", None, None
    try:
        return "vitmatte", load_matte(model), None
    except ModelUnavailable as exc:
        if method == "vitmatte":
            raise
        return "guided_filter", None, f"no ViTMatte weights ({exc.message})"


def matte_frames(
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    out_dir: Path,
    numbers: Sequence[int],
    *,
    method: Method = "auto",
    model: str = DEFAULT_MODEL,
    erode_px: int = 3,
    dilate_px: int = 6,
    progress: Progress | None = None,
) -> MatteResult:
    """`matte_%04d.png` (RGBA) per frame; cancellable between frames."""
    used, loaded, reason = pick_method(method, model)
    files = []
    for position, (frame, mask, number) in enumerate(zip(frames, masks, numbers, strict=True)):
        if cancel_requested():
            raise Cancelled(CANCELLED)
        band = trimap(mask, erode_px, dilate_px)
        if loaded is not None:
            alpha = vitmatte_alpha(loaded, frame, band)
        else:
            alpha = guided_alpha(frame, mask, band, radius=max(2, dilate_px // 2 + 1))
        path = out_dir / f"matte_{number:04d}.png"
        path.write_bytes(rgba_png(frame, alpha))
        files.append(path)
        if progress is not None and (position + 1) % 4 == 0:
            progress((position + 1) / len(frames), f"frame {position + 1} of {len(frames)}")
    return MatteResult(used, files, reason)
