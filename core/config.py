"""Settings from the environment, read once per process (pydantic-settings).

Every setting is an environment variable of the same name in upper case; the README lists
them all. Bucket settings use RunPod's own names so an endpoint's existing S3 configuration
works unchanged.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Weights: looked up in this order; downloads only where allowed.
    weights_dir: Path = Field(default=REPO_ROOT / "weights")
    volume_weights_dir: Path = Field(default=Path("/runpod-volume/weights"))
    hub_cache_dir: Path = Field(default=Path("/runpod-volume/huggingface-cache/hub"))
    """RunPod's cached models (a Hugging Face cache), for models that come from a hub."""
    allow_model_downloads: bool = True
    preload_models: str = ""
    """Comma-separated `task` or `task=model` entries loaded before the worker takes jobs."""
    max_loaded_models: int = Field(default=6, ge=1)
    device: str = "auto"
    """`auto` picks cuda:0 when available, else cpu; or name one (`cpu`, `cuda:1`)."""
    half_precision: bool = True
    """fp16 inference on CUDA (ignored on CPU)."""
    max_concurrency: int = Field(default=1, ge=1, le=64)
    """Jobs one worker runs at once (RunPod's `concurrency_modifier`); models keep one lock each."""

    # Input limits.
    max_input_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    max_batch_images: int = Field(default=16, ge=1)
    max_input_frames: int = Field(default=1000, ge=1)
    """Cap on the images of a clip sent as `frames` (the Orbit app's shape)."""
    splat_max_input_bytes: int = Field(default=2 * 1024**3, ge=1)
    """Cap on a splat job's video, zip or each photo (they are larger than images)."""
    cpu_max_gaussians: int = Field(default=20_000, ge=1_000)
    """On CPU the splat's Gaussian count is capped here (steps slow down with the count)."""
    work_dir: Path | None = None
    """Where jobs keep their temporary files (removed after each job); default: the system's."""
    allow_private_urls: bool = False
    fetch_timeout_s: float = Field(default=30.0, gt=0)
    fetch_retries: int = Field(default=3, ge=0, le=10)
    max_request_pixels: int = Field(default=1_000_000_000, ge=1)
    """Cap on the pixels of all of one request's images (or `frames`) together, read from
    their headers before any is decoded; a batch of images is held decoded at once (3 bytes a
    pixel), a clip's frames are decoded one at a time."""
    max_video_pixels: int = Field(default=36_000_000, ge=1)
    """Cap on a video's frame size (width x height); 8K (8192x4320) fits."""
    fetch_deadline_s: float = Field(default=120.0, gt=0)
    """Total time for one URL or s3:// input: every try, redirect and wait, and the body."""
    splat_fetch_deadline_s: float = Field(default=900.0, gt=0)
    """FETCH_DEADLINE_S for a splat job's video, zip or photos (up to SPLAT_MAX_INPUT_BYTES)."""

    upload_dir: Path = REPO_ROOT / "outputs" / "uploads"
    """Where the local server's app upload routes (Orbit's `upload_video`, the VFX platform's
    `/api/process`) keep files; a job names one as `upload://<id>` (a safe name, never a path)."""

    # Outputs.
    output_dir: Path | None = None
    inline_max_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    """Base64 bytes of artifacts allowed inline in one result (RunPod drops results > 20 MB)."""
    frames_inline_max_bytes: int = Field(default=2 * 1024 * 1024, ge=0)
    """Per-frame video results larger than this (as JSON) go out as a `frames.json` artifact."""
    bucket_endpoint_url: str | None = None
    bucket_access_key_id: str | None = None
    bucket_secret_access_key: str | None = None
    bucket_name: str | None = None
    bucket_region: str | None = None
    bucket_key_prefix: str = ""
    presign_expires_s: int = Field(default=7 * 24 * 3600, ge=60, le=7 * 24 * 3600)
    s3_timeout_s: float = Field(default=60.0, gt=0)
    s3_retries: int = Field(default=4, ge=0, le=10)
    public_base_url: str | None = None
    """When set, every stored artifact also carries `public_url`: this base + its key (a
    public bucket or CDN in front of the bucket, or a server in front of OUTPUT_DIR)."""

    # Callbacks an app asks for (Game View's `callback_url`): signed, bounded, guarded.
    callback_signing_secret: SecretStr | None = None
    """Standard Webhooks secret (`whsec_<base64>`); callbacks carry webhook-id,
    webhook-timestamp and webhook-signature. Unset: callbacks go unsigned."""
    callback_timeout_s: float = Field(default=10.0, gt=0, le=300)
    callback_retries: int = Field(default=3, ge=0, le=10)

    # Local runs: the SDK's log cuts results at 4 KB; this writes the whole result as JSON.
    result_path: Path | None = None
    progress_min_interval_s: float = Field(default=1.0, ge=0)

    @property
    def bucket_configured(self) -> bool:
        return bool(self.bucket_name and self.bucket_access_key_id)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    if not settings.allow_model_downloads:
        # Ultralytics checks connectivity at import unless told it is offline.
        os.environ.setdefault("YOLO_OFFLINE", "1")
    return settings
