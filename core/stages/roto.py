"""roto: masks per frame for text concepts (SAM 3) or clicked objects (SAM 2), as PNGs.

Files (under the project's `roto/`), numbered like the frames:
- `<concept>/mask_%04d.png`: every instance of the concept in the frame, one per frame per
  concept (an empty mask where none was found), the seed's `mask_count`;
- `<concept>/id_<n>/mask_%04d.png`: one instance (SAM 3's track id, or the SAM 2 object id),
  on the frames where it was found;
- `all/mask_%04d.png`: the union of every concept, which matte, cleanplate and the camera
  solve read as "the subject".

SAM 3 runs through its task's video predictor (`core/tasks/sam3.py`), frame by frame, the
concepts' instances tracked with ids; SAM 2 through its task's `track_objects` (point or box
prompts on any frame, propagated both ways).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from core.control import cancel_requested
from core.errors import Cancelled, InvalidInput

if TYPE_CHECKING:
    from core.contract import JobContext
    from core.models import LoadedModel
    from core.tasks._sam2_prompts import Prompt

Progress = Callable[[float, str], None]
CANCELLED = "the job was cancelled (or ran past its execution timeout)"
COMBINED = "all"


@dataclass(frozen=True)
class RotoInstance:
    concept: str
    instance_id: int | str
    mask: np.ndarray
    """bool HxW at the frame's size."""


@dataclass
class RotoResult:
    concepts: dict[str, str]
    """Each concept -> its folder under roto/."""
    mask_count: int = 0
    """Per-frame per-concept masks written."""
    instance_mask_count: int = 0
    instances: dict[str, list[str]] = field(default_factory=dict)
    """Each concept's folder -> the instance ids seen."""
    frames_with_subject: int = 0
    combined: list[np.ndarray] = field(default_factory=list)


def concept_folder(concept: str, index: int) -> str:
    """A concept as a folder name: `red car` -> `red_car` (never a path)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", concept.strip()).strip("._-")[:64]
    if not slug or slug == COMBINED:
        slug = f"concept_{index}"
    return slug


def mask_png(mask: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", np.where(mask, 255, 0).astype(np.uint8))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buffer.tobytes()


def read_mask(path: Path) -> np.ndarray:
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise InvalidInput(f"{path.name} is missing or unreadable")
    return pixels >= 128


def write_roto(
    per_frame: Iterable[list[RotoInstance]],
    concepts: Sequence[str],
    roto_dir: Path,
    numbers: Sequence[int],
    size: tuple[int, int],
    *,
    progress: Progress | None = None,
) -> RotoResult:
    """Write every frame's masks (see the module docstring); cancellable between frames."""
    height, width = size
    folders = {concept: concept_folder(concept, i) for i, concept in enumerate(concepts)}
    if len(set(folders.values())) != len(folders):
        raise InvalidInput(f"roto: concepts {list(concepts)} name the same folder twice")
    result = RotoResult(concepts=folders)
    seen: dict[str, set[str]] = {folder: set() for folder in folders.values()}
    for folder in (*folders.values(), COMBINED):
        (roto_dir / folder).mkdir(parents=True, exist_ok=True)
    frames = iter(per_frame)
    for position, number in enumerate(numbers):
        if cancel_requested():
            raise Cancelled(CANCELLED)
        instances = next(frames, None)
        if instances is None:
            raise RuntimeError(f"roto: no masks for frame {number}")
        union = np.zeros((height, width), bool)
        for concept, folder in folders.items():
            mine = [inst for inst in instances if inst.concept == concept]
            concept_mask = np.zeros((height, width), bool)
            for inst in mine:
                concept_mask |= inst.mask
                ident = f"id_{inst.instance_id}"
                (roto_dir / folder / ident).mkdir(exist_ok=True)
                (roto_dir / folder / ident / f"mask_{number:04d}.png").write_bytes(
                    mask_png(inst.mask)
                )
                seen[folder].add(ident)
                result.instance_mask_count += 1
            (roto_dir / folder / f"mask_{number:04d}.png").write_bytes(mask_png(concept_mask))
            result.mask_count += 1
            union |= concept_mask
        (roto_dir / COMBINED / f"mask_{number:04d}.png").write_bytes(mask_png(union))
        result.combined.append(union)
        result.frames_with_subject += int(union.any())
        if progress is not None and (position + 1) % 4 == 0:
            progress((position + 1) / len(numbers), f"frame {position + 1} of {len(numbers)}")
    result.instances = {folder: sorted(ids) for folder, ids in seen.items()}
    return result


def read_combined(roto_dir: Path, numbers: Sequence[int]) -> list[np.ndarray]:
    """The subject masks (`all/`) a roto run wrote, in frame order."""
    folder = roto_dir / COMBINED
    if not folder.is_dir():
        raise InvalidInput("no roto masks in the project: run the roto stage first")
    return [read_mask(folder / f"mask_{number:04d}.png") for number in numbers]


# --------------------------------------------------------------------------------------------
# Models


def sam3_instances(
    loaded: LoadedModel,
    frames: Sequence[np.ndarray],
    concepts: list[str],
    *,
    device: str,
    threshold: float,
    imgsz: int,
    new_object_threshold: float = 0.5,
    max_objects: int = 64,
) -> Iterator[list[RotoInstance]]:
    """SAM 3's detect-and-track, one frame at a time: each frame's instances with track ids."""
    from core.tasks.sam3 import _video_predictor_class, ensure_tracker, predictor_args

    with loaded.lock:  # tracker state and text embeddings live on the shared models
        ensure_tracker(loaded.model)
        args = predictor_args(device, threshold, imgsz, model=str(loaded.model.path))
        predictor = _video_predictor_class()(
            loaded.model,
            args,
            score_threshold_detection=new_object_threshold,
            max_num_objects=max_objects,
        )
        predictor.setup_model(verbose=False)
        for position, pixels in enumerate(frames):
            if cancel_requested():
                raise Cancelled(CANCELLED)
            if position == 0:
                predictor.start(pixels, len(frames))
            yield results_to_instances(predictor.step(position, pixels, concepts), concepts)


def results_to_instances(result: Any, concepts: list[str]) -> list[RotoInstance]:
    """An Ultralytics `Results` of SAM 3 -> instances (the class indexes `concepts`)."""
    boxes, masks = result.boxes, result.masks
    if boxes is None or len(boxes) == 0 or masks is None:
        return []
    classes = boxes.cls.cpu().numpy().astype(int)
    ids = boxes.id.cpu().numpy().astype(int) if boxes.id is not None else np.arange(len(classes))
    binary = masks.data.cpu().numpy() > 0.5
    height, width = result.orig_shape
    out = []
    for index, (cls, ident) in enumerate(zip(classes, ids, strict=True)):
        if not 0 <= cls < len(concepts):
            continue
        mask = binary[index]
        if mask.shape != (height, width):
            resized = cv2.resize(
                mask.astype(np.uint8), (int(width), int(height)), interpolation=cv2.INTER_NEAREST
            )
            mask = resized > 0
        out.append(RotoInstance(concepts[cls], int(ident), mask))
    return out


def sam2_instances(
    loaded: LoadedModel,
    frames: Sequence[np.ndarray],
    prompts: list[Prompt],
    positions: dict[int | str, int],
    ctx: JobContext,
    concept: str = "object",
) -> list[list[RotoInstance]]:
    """SAM 2 from point or box prompts: each frame's objects, the prompt ids as instance ids."""
    from core.media import VideoFrame
    from core.tasks.sam2 import track_objects

    height, width = frames[0].shape[:2]
    clip = [VideoFrame(index=i, time_s=0.0, pixels=pixels) for i, pixels in enumerate(frames)]
    tracked = track_objects(loaded, clip, width, height, prompts, positions, ctx)
    return [
        [RotoInstance(concept, ident, mask) for ident, mask in per_object.items()]
        for per_object in tracked
    ]
