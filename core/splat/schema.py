"""Splat job requests: our shape, the Game View presets, and the Splatt app's shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import InvalidInput

# As the Game View app knows them; explicit fields override.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"iterations": 5_000, "max_gaussians": 5_000_000, "fps": 5.0},
    "balanced": {"iterations": 15_000, "max_gaussians": 10_000_000, "fps": 10.0},
    "high": {"iterations": 30_000, "max_gaussians": 20_000_000, "fps": 15.0},
}
FORMATS = ("ply", "splat", "ply_compressed", "rgb_ply")


class SplatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    task: Literal["splat", "sfm"] = "splat"
    video: str | None = None
    images: list[str] | None = Field(default=None, min_length=1, max_length=2000)
    zip: str | None = None
    preset: Literal["fast", "balanced", "high"] = "balanced"
    fps: float | None = Field(default=None, gt=0, le=60)
    start_sec: float = Field(default=0.0, ge=0)
    end_sec: float | None = Field(default=None, gt=0)
    iterations: int | None = Field(default=None, ge=1, le=200_000)
    max_gaussians: int | None = Field(default=None, ge=1_000, le=50_000_000)
    max_frames: int = Field(default=300, ge=2, le=2_000)
    max_side: int = Field(default=1600, ge=64, le=4096)
    """Frames are resized to this longest side before SfM."""
    train_max_side: int | None = Field(default=None, ge=32, le=4096)
    """Training resolution; default: max_side on CUDA, 320 on CPU."""
    sh_degree: int = Field(default=3, ge=0, le=3)
    formats: list[Literal["ply", "splat", "ply_compressed", "rgb_ply"]] = Field(
        default_factory=lambda: ["ply", "splat"]
    )
    matching: Literal["auto", "sequential", "exhaustive"] = "auto"
    # The Splatt app's shape, accepted as it is.
    task_id: str | None = Field(default=None, max_length=128)
    filebin_url: str | None = None
    filename: str | None = Field(default=None, max_length=255)

    @model_validator(mode="after")
    def _check(self) -> SplatRequest:
        if self.end_sec is not None and self.end_sec <= self.start_sec:
            raise ValueError(f"end_sec ({self.end_sec}) must be after start_sec ({self.start_sec})")
        return self

    @property
    def splatt(self) -> bool:
        """The Splatt app's request: its file names and stages."""
        return self.filebin_url is not None

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def source(self) -> tuple[str, Any]:
        """(`video` | `images` | `zip`, value); exactly one must be given."""
        video = self.video
        if self.filebin_url:
            video = self.filebin_url
            if self.filename and not self.filebin_url.rstrip("/").endswith(self.filename):
                video = f"{self.filebin_url.rstrip('/')}/{self.filename}"
        given = [
            (k, v) for k, v in (("video", video), ("images", self.images), ("zip", self.zip)) if v
        ]
        if len(given) != 1:
            raise InvalidInput(
                "send exactly one of video (or the Splatt app's filebin_url), images, zip"
                + (f" (got {', '.join(k for k, _ in given)})" if given else "")
            )
        return given[0]

    def resolved(self) -> dict[str, Any]:
        """The preset with explicit fields laid over it."""
        settings = dict(PRESETS[self.preset])
        for key in ("iterations", "max_gaussians", "fps"):
            value = getattr(self, key)
            if value is not None:
                settings[key] = value
        return settings
