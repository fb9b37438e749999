"""SAM 2 on a clip held in memory: the sampled frames go to `init_state` without a folder of
JPEGs, and propagation runs forward then backward from the prompts, forgetting per-frame
memory SAM 2 can no longer read so a long clip's state stays bounded.

`init_state(video_path)` reads frames through `sam2.utils.misc.load_video_frames`, which only
knows a JPEG folder or an mp4 path (through decord). The package's video module gets one
wrapper, installed once, that hands a `ClipFrames` over as it is and passes anything else to
the original, so concurrent jobs never race on a patched global. A `ClipFrames` is the lazy
frame list SAM 2 itself uses for asynchronous loading (`__getitem__`, `__len__`): a frame is
normalised to the model's input only when SAM 2 asks for it, and the clip is held as uint8
at most `max_side` pixels long (SAM 2 resizes every frame to its 1024 px input anyway).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

_install_lock = threading.Lock()
_installed = False

# The normalisation `load_video_frames` applies (ImageNet mean and std).
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


class ClipFrames:
    """Frames (BGR uint8, any size) presented to SAM 2 as its preprocessed video tensor list.

    `height`/`width` are the size masks come back at (the source's, so prompts and masks
    are in source pixels even when the stored frames were downscaled)."""

    def __init__(self, frames: Sequence[np.ndarray], height: int, width: int, image_size: int):
        import torch

        if not frames:
            raise ValueError("a clip needs at least one frame")
        self.frames = frames
        self.height = height
        self.width = width
        self.image_size = image_size
        self._mean = torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> Any:
        """The frame as SAM 2's JPEG-folder loader makes it: RGB resized with PIL's default
        filter to a square, scaled to 0..1, normalised."""
        import torch
        from PIL import Image

        rgb = np.ascontiguousarray(self.frames[index][:, :, ::-1])
        resized = Image.fromarray(rgb).resize((self.image_size, self.image_size))
        tensor = torch.from_numpy(np.asarray(resized) / 255.0).permute(2, 0, 1).float()
        tensor -= self._mean
        tensor /= self._std
        return tensor


def install_clip_loader() -> None:
    """Let `SAM2VideoPredictor.init_state` take a `ClipFrames` (idempotent, thread-safe)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        import sam2.sam2_video_predictor as video_module

        original: Callable[..., Any] = video_module.load_video_frames

        def load_video_frames(video_path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(video_path, ClipFrames):
                return video_path, video_path.height, video_path.width
            return original(video_path, *args, **kwargs)

        video_module.load_video_frames = load_video_frames
        _installed = True


def memory_window(predictor: Any) -> int:
    """How many frames back (in the direction of travel) SAM 2 reads a frame's memory:
    its mask memories (`num_maskmem` at the eval stride) and its object pointers."""
    stride = int(getattr(predictor, "memory_temporal_stride_for_eval", 1))
    masks = int(predictor.num_maskmem) * stride
    pointers = int(getattr(predictor, "max_obj_ptrs_in_encoder", 16))
    return max(masks, pointers) + 1


def forget_far_frames(
    state: dict[str, Any], frame_idx: int, reverse: bool, window: int, prompt_frames: set[int]
) -> None:
    """Drop every object's non-conditioning output `window` frames behind `frame_idx`.

    Nothing later reads it: the pass going on reads at most `window - 1` frames back, and
    the backward pass starts at the earliest prompt, reading frames after it, so outputs
    within `window` of a prompt frame are kept."""
    stale = frame_idx + window if reverse else frame_idx - window
    if stale < 0 or any(abs(stale - p) <= window for p in prompt_frames):
        return
    for per_object in state["output_dict_per_obj"].values():
        per_object["non_cond_frame_outputs"].pop(stale, None)


def propagate(
    predictor: Any, state: dict[str, Any], prompt_frames: set[int], *, prune: bool = True
) -> Iterator[tuple[int, list[Any], Any]]:
    """`propagate_in_video` forward from the earliest prompt frame to the end, then backward
    from it to the start (skipped when it is frame 0): `(frame, object ids, mask logits)`.

    The prompt frame comes out of both passes; callers keep one."""
    window = memory_window(predictor)
    for reverse in (False, True):
        if reverse and min(prompt_frames) == 0:
            break
        for frame_idx, obj_ids, logits in predictor.propagate_in_video(state, reverse=reverse):
            yield frame_idx, list(obj_ids), logits
            if prune:
                forget_far_frames(state, frame_idx, reverse, window, prompt_frames)
