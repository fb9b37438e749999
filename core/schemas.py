"""Request and response models (pydantic). The README shows each with examples.

Unknown keys are not errors: the apps in front of us send options meant for other tasks,
so they come back as `warnings` in the result instead of failing the job. Wrong types and
out-of-range values are errors naming the field.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.encode import MASK_FORMATS
from core.media import MAX_TIME_S, window_error


def takes_number(annotation: Any) -> bool:
    """Whether a field's type holds numbers (int, float, or containers of them), not bools."""
    if annotation in (int, float):
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return takes_number(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        return bool not in args and any(takes_number(arg) for arg in args)
    if origin in (list, tuple, set, frozenset):
        return any(takes_number(arg) for arg in get_args(annotation) if arg is not Ellipsis)
    return False


def holds_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list | tuple):
        return any(holds_bool(item) for item in value)
    if isinstance(value, dict):
        return any(holds_bool(item) for item in value.values())
    return False


class StrictModel(BaseModel):
    """Base of every request model. Python's `True == 1` and pydantic's lax mode would take
    `threshold: true` as 1.0 and `classes: [true]` as class 1; JSON booleans are not numbers,
    so a number field refuses them (at any depth), and infinities and NaN are refused too."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if (
            name is not None
            and holds_bool(value)
            and takes_number(cls.model_fields[name].annotation)
        ):
            raise ValueError("must be a number, not true or false")
        return value


def _lower_mask_format(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in MASK_FORMATS:
        return value.lower()
    return value


MaskFormat = Annotated[Literal["polygon", "rle", "png"], BeforeValidator(_lower_mask_format)]
"""How a mask is encoded (`core/encode.py`): any case is accepted."""


class InferRequest(StrictModel):
    """The `input` of an infer job. Exactly one media field is used, by the task's needs."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    task: str = Field(min_length=1, max_length=64)
    model: str | None = Field(default=None, min_length=1, max_length=255)
    image: str | None = None
    images: list[str] | None = Field(default=None, min_length=1)
    video: str | None = None
    # A clip as a list of images, in order, with its frame rate.
    frames: list[str] | None = Field(default=None, min_length=1)
    fps: float | None = Field(default=None, gt=0, le=240)
    media: str | None = None
    """An image or a video, told apart by its bytes (for clients that do not know which)."""
    options: dict[str, Any] = Field(default_factory=dict)
    annotate: bool | None = None

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class TaskOptions(StrictModel):
    """Base of every task's options; subclasses add fields."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    @classmethod
    def parse(cls, options: dict[str, Any], task: str) -> tuple[TaskOptions, list[str]]:
        from pydantic import ValidationError

        from core.errors import InvalidInput, describe_validation_error

        try:
            parsed = cls.model_validate(options)
        except ValidationError as exc:
            raise InvalidInput(describe_validation_error(exc, prefix="options.")) from exc
        unused = sorted(set(options) - set(cls.model_fields))
        warnings = [f"options.{key} is not used by {task}" for key in unused]
        return parsed, warnings


class VideoOptions(TaskOptions):
    """Frame sampling. Tasks set their own `max_frames` default by overriding the field."""

    fps: float | None = Field(
        default=None, gt=0, le=240, description="sample at most this many frames per second"
    )
    max_frames: int = Field(default=300, ge=1, le=10_000)
    start_sec: float = Field(default=0.0, ge=0, le=MAX_TIME_S)
    end_sec: float | None = Field(default=None, gt=0, le=MAX_TIME_S)

    @model_validator(mode="after")
    def _end_after_start(self) -> VideoOptions:
        problem = window_error(self.start_sec, self.end_sec)
        if problem:
            raise ValueError(problem)
        return self


class YoloOptions(VideoOptions):
    threshold: float = Field(default=0.25, ge=0.0, le=1.0, description="confidence threshold")
    iou: float = Field(default=0.7, ge=0.0, le=1.0, description="NMS IoU threshold")
    max_det: int = Field(default=300, ge=1, le=3000)
    imgsz: int = Field(default=640, ge=32, le=4096)
    classes: list[int | str] | None = Field(
        default=None, description="keep only these classes: ids or names (or 'a, b' string)"
    )
    agnostic_nms: bool = False
    annotate: bool = False
    # Video only. The tracker is named, not left to Ultralytics' default, which has changed
    # between releases; these three need no extra weights.
    track: bool = Field(default=True, description="video: follow objects across frames")
    tracker: Literal["bytetrack", "botsort", "ocsort"] = "bytetrack"

    @field_validator("classes", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        return value

    @field_validator("classes")
    @classmethod
    def _non_negative(cls, value: list[int | str] | None) -> list[int | str] | None:
        if value is not None:
            if not value:
                return None
            for item in value:
                if isinstance(item, int) and item < 0:
                    raise ValueError("class ids must be >= 0")
        return value


class DetectionOptions(YoloOptions):
    pass


class SegmentationOptions(YoloOptions):
    mask_format: MaskFormat = "polygon"


class PoseOptions(YoloOptions):
    pass


class HealthOptions(TaskOptions):
    pass


# --------------------------------------------------------------------------------------------
# Responses


class Keypoint(BaseModel):
    name: str
    x: float
    y: float
    confidence: float


class Detection(BaseModel):
    box: list[float] = Field(description="pixel [x1, y1, x2, y2] in the original image")
    confidence: float
    class_id: int
    label: str
    track_id: int | None = None
    mask: dict[str, Any] | None = None
    keypoints: list[Keypoint] | None = None


class ImageResult(BaseModel):
    index: int
    width: int
    height: int
    detections: list[Detection]
    preview: dict[str, Any] | None = None
