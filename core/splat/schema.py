"""Splat job requests: our shape and the presets (as the Game View app knows them).

Apps' shapes (Splatt's `filebin_url`, ...) are translated in `core/apps/`; what they need
from us is generic here: `formats`, `artifact_names` and `output_folder`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, field_validator, model_validator

from core.errors import InvalidInput
from core.media import MAX_TIME_S, window_error
from core.naming import safe_name_error
from core.schemas import StrictModel


@dataclass(frozen=True)
class Preset:
    iterations: int
    max_gaussians: int
    fps: float


# As the Game View app knows them; explicit fields override.
PRESETS: dict[str, Preset] = {
    "fast": Preset(iterations=5_000, max_gaussians=5_000_000, fps=5.0),
    "balanced": Preset(iterations=15_000, max_gaussians=10_000_000, fps=10.0),
    "high": Preset(iterations=30_000, max_gaussians=20_000_000, fps=15.0),
}
Format = Literal["ply", "ply_sh0", "splat", "ply_compressed", "rgb_ply"]
FORMATS: tuple[str, ...] = get_args(Format)


def _default_formats() -> list[Format]:
    return ["ply", "splat"]


# The file each format is written to, unless `artifact_names` renames it.
FORMAT_FILES: dict[str, str] = {
    "ply": "splat.ply",
    "ply_sh0": "splat_sh0.ply",
    "splat": "scene.splat",
    "ply_compressed": "splat.compressed.ply",
    "rgb_ply": "points_rgb.ply",
}


class SplatRequest(StrictModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    task: Literal["splat", "sfm", "health"] = "splat"
    video: str | None = None
    videos: list[str] | None = Field(default=None, min_length=1, max_length=16)
    """Several clips of one scene, reconstructed together: frames from each (fps and the
    time window apply to each, `max_frames` is shared), one camera model per clip."""
    images: list[str] | None = Field(default=None, min_length=1, max_length=2000)
    zip: str | None = None
    preset: Literal["fast", "balanced", "high"] = "balanced"
    fps: float | None = Field(default=None, gt=0, le=60)
    start_sec: float = Field(default=0.0, ge=0, le=MAX_TIME_S)
    end_sec: float | None = Field(default=None, gt=0, le=MAX_TIME_S)
    iterations: int | None = Field(default=None, ge=1, le=200_000)
    max_gaussians: int | None = Field(default=None, ge=1_000, le=50_000_000)
    max_frames: int = Field(default=300, ge=2, le=2_000)
    max_side: int = Field(default=1600, ge=64, le=4096)
    """Frames are resized to this longest side before SfM."""
    train_max_side: int | None = Field(default=None, ge=32, le=4096)
    """Training resolution; default: max_side on CUDA, 320 on CPU."""
    sh_degree: int = Field(default=3, ge=0, le=3)
    formats: list[Format] = Field(default_factory=_default_formats)
    """`ply_sh0` is the PLY with colours baked to SH degree 0 (RGB only)."""
    artifact_names: dict[Format, str] = Field(default_factory=dict)
    """File names for formats, instead of FORMAT_FILES (an app's own names)."""
    output_folder: str | None = Field(default=None, min_length=1, max_length=128)
    """The folder (or key prefix) the artifacts go under; default: the job's id."""
    matching: Literal["auto", "sequential", "exhaustive"] = "auto"
    app_warnings: list[str] = Field(default_factory=list, max_length=32)
    """Set by an app's translation (fields of its own it cannot honour); end in `warnings`."""
    features: Literal["low", "medium", "high"] = "medium"
    """SIFT features kept per frame: 2048 / 8192 / 16384 (sfm.FEATURE_LEVELS)."""
    mapper: Literal["incremental", "global", "auto"] = "auto"
    """Global (GLOMAP) falls back to incremental when it registers under 90 % of the frames;
    auto is global from 200 frames on (sfm.GLOBAL_AUTO_MIN_IMAGES), else incremental."""
    orient: Literal["none", "z_up", "y_up"] = "z_up"
    """The scene's frame: estimated up onto +Z (or +Y), camera centroid at the origin;
    `none` keeps COLMAP's arbitrary world. Recorded as `applied_transform`."""

    @model_validator(mode="after")
    def _check(self) -> SplatRequest:
        problem = window_error(self.start_sec, self.end_sec)
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("artifact_names")
    @classmethod
    def _file_names(cls, value: dict[Format, str]) -> dict[Format, str]:
        for fmt, name in value.items():
            problem = safe_name_error(name)
            if problem:
                raise ValueError(f"{fmt}: {problem}")
        return value

    @field_validator("output_folder")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        problem = None if value is None else safe_name_error(value)
        if problem:
            raise ValueError(problem)
        return value

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def file_name(self, fmt: Format) -> str:
        return self.artifact_names.get(fmt, FORMAT_FILES[fmt])

    def source(self) -> tuple[str, Any]:
        """(`video` | `videos` | `images` | `zip`, value); exactly one must be given."""
        sources = (
            ("video", self.video),
            ("videos", self.videos),
            ("images", self.images),
            ("zip", self.zip),
        )
        given = [(k, v) for k, v in sources if v]
        if len(given) != 1:
            raise InvalidInput(
                "send exactly one of video, videos, images, zip"
                + (f" (got {', '.join(k for k, _ in given)})" if given else "")
            )
        return given[0]

    def resolved(self) -> Preset:
        """The preset with explicit fields laid over it."""
        preset = PRESETS[self.preset]
        overrides = {
            key: getattr(self, key)
            for key in ("iterations", "max_gaussians", "fps")
            if getattr(self, key) is not None
        }
        return replace(preset, **overrides)
