"""sam3-concept-segmentation: SAM 3 masks for every instance of text concepts ("person, bicycle").

Ultralytics' SAM 3 predictors do the work: `SAM3SemanticPredictor` on images,
`SAM3VideoSemanticPredictor` on clips (detections on each frame, matched to masklets that SAM 3's
tracker carries forward, so an object keeps its id across frames). The clip's frames come from
`core.video` (our sampling: `fps`, `start_sec`, `end_sec`, `max_frames`) and are fed to the
video predictor one at a time, not through its own file reader.

Weights: `sam3.pt` from Hugging Face `facebook/sam3` (gated; about 3.4 GB). One file holds the
detector (`detector.*`) and the tracker (`tracker.*`); the detector is built once per worker
and shared by image and video jobs, the tracker (small) is built on the first clip.

Two packages Ultralytics imports at build time and never installs here (YOLO_AUTOINSTALL is
off): `timm`, and a `clip` module for the text tokenizer. PyPI's `clip-anytorch` (the same code
as `openai-clip`) provides `clip`; it imports `pkg_resources`, so it needs `setuptools<81`. Its
`SimpleTokenizer` is not callable, which Ultralytics 8.4 expects (its GitHub fork of CLIP added
`__call__`); `clip.tokenize(..., truncate=True)` gives the same tokens, so the text encoder is
given that (see `clip_tokenizer`).
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from core.annotate import ClipAnnotator, sample_rate
from core.config import get_settings
from core.contract import JobContext, TaskRequest
from core.encode import encode_mask, image_to_jpeg
from core.errors import InvalidInput, ModelUnavailable
from core.media import VideoFrame
from core.models import (
    HubFile,
    LoadedModel,
    check_model_name,
    download_whole,
    get_registry,
    worker_device,
)
from core.schemas import MaskFormat, VideoOptions
from core.tasks import Task, register
from core.tasks._yolo import summarise_tracks
from core.video import clip_info, frame_stamp, is_clip, iter_clip_frames, per_frame_output

log = logging.getLogger("worker.sam3")

MODEL_KIND = "sam3"
DEFAULT_MODEL = "sam3.pt"
HUB_REPO = "facebook/sam3"
STRIDE = 14
"""SAM 3's ViT patch size: the input side is a multiple of it."""
NATIVE_IMGSZ = 1008
CONTEXT_LENGTH = 32
"""Tokens per concept in SAM 3's text encoder (longer concepts are cut, ending in EOT)."""
MAX_CONCEPTS = 32
MAX_CONCEPT_CHARS = 200

PACKAGES_HINT = (
    "install them with `pip install clip-anytorch==2.6.0 ftfy==6.3.1 timm==1.0.31 "
    "'setuptools<81'` (clip-anytorch provides the `clip` module SAM 3's tokenizer comes from; "
    "it imports pkg_resources, which setuptools 81 removed)"
)


def how_to_provide(settings: Any) -> str:
    """The one place that says how a deployment gets the gated checkpoint."""
    return (
        f"SAM 3 weights are gated: request access at https://huggingface.co/{HUB_REPO}, "
        f"download {DEFAULT_MODEL} (about 3.4 GB) and put it in WEIGHTS_DIR "
        f"({settings.weights_dir}) or the network volume's weights folder "
        f"({settings.volume_weights_dir}); or bake it into the image by building with the "
        "secret `hf_token` (a token with access; WEIGHTS=default then includes sam3.pt); or set "
        "HF_TOKEN and ALLOW_MODEL_DOWNLOADS=true to fetch it on first use"
    )


# --------------------------------------------------------------------------------------------
# Options


class Sam3Options(VideoOptions):
    text_prompt: list[str] = Field(
        description="concepts to find, as the Studio sends them ('person, bicycle') or a list"
    )
    threshold: float = Field(
        default=0.25, ge=0.0, le=1.0, description="keep instances scoring above this"
    )
    iou: float = Field(default=0.7, ge=0.0, le=1.0, description="image: NMS IoU per concept")
    max_det: int = Field(default=100, ge=1, le=1000, description="instances kept per image")
    imgsz: int = Field(
        default=NATIVE_IMGSZ,
        ge=STRIDE * 8,
        le=STRIDE * 144,
        description="model input side in pixels (rounded up to a multiple of 14); "
        "SAM 3 is trained at 1008",
    )
    mask_format: MaskFormat = "rle"
    annotate: bool = Field(
        default=False, description="also return a JPEG preview (image) or an annotated mp4 (video)"
    )
    # Video only.
    new_object_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="video: a detection scoring above this starts a new object (SAM 3's 0.5)",
    )
    max_objects: int = Field(
        default=64, ge=1, le=1000, description="video: most objects followed at once"
    )
    max_side: int | None = Field(
        default=None, ge=64, le=8192, description="video: resize frames to this longest side"
    )

    @field_validator("text_prompt", mode="before")
    @classmethod
    def _concepts(cls, value: Any) -> Any:
        return parse_concepts(value)

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_stride(cls, value: int) -> int:
        return -(-value // STRIDE) * STRIDE


def parse_concepts(value: Any) -> Any:
    """`"person, bicycle"` or `["person", "bicycle"]` -> `["person", "bicycle"]`: trimmed, in
    order, repeats dropped (case-insensitively). Anything else is left for pydantic to refuse."""
    if isinstance(value, str):
        parts: list[Any] = value.replace("\n", ",").replace(";", ",").split(",")
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        return value
    concepts: list[str] = []
    seen: set[str] = set()
    for part in parts:
        if not isinstance(part, str):
            return value  # pydantic names the bad item
        concept = " ".join(part.split())
        if concept and concept.lower() not in seen:
            seen.add(concept.lower())
            concepts.append(concept)
    if not concepts:
        raise ValueError("give at least one concept, e.g. 'person, bicycle'")
    if len(concepts) > MAX_CONCEPTS:
        raise ValueError(f"{len(concepts)} concepts; at most {MAX_CONCEPTS} per request")
    too_long = [c for c in concepts if len(c) > MAX_CONCEPT_CHARS]
    if too_long:
        raise ValueError(f"a concept is longer than {MAX_CONCEPT_CHARS} characters")
    return concepts


# --------------------------------------------------------------------------------------------
# Packages and the tokenizer


@lru_cache(maxsize=1)
def import_clip() -> types.ModuleType:
    """The `clip` module Ultralytics builds SAM 3's tokenizer from, or `model_unavailable`."""
    try:
        with warnings.catch_warnings():
            # clip-anytorch's `from pkg_resources import packaging` warns on every start.
            warnings.simplefilter("ignore")
            import clip
    except ImportError as exc:
        raise ModelUnavailable(
            f"SAM 3's text tokenizer needs the `clip` module ({exc}); {PACKAGES_HINT}"
        ) from exc
    return clip


def require_packages() -> None:
    """Fail with how to install them, before Ultralytics tries to pip-install them itself."""
    import_clip()
    try:
        import timm  # noqa: F401 - SAM 3's ViT blocks come from timm
    except ImportError as exc:
        raise ModelUnavailable(f"SAM 3 needs `timm` ({exc}); {PACKAGES_HINT}") from exc


def clip_tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> Any:
    """What SAM 3's text encoder calls: `(texts, context_length) -> LongTensor[n, context_length]`,
    each row `<start> tokens... <end>` then zeros; a longer concept is cut and still ends in
    `<end>`. Token for token what the Ultralytics CLIP fork's `SimpleTokenizer.__call__` gives."""
    clip = import_clip()
    return clip.tokenize(texts, context_length=context_length, truncate=True).long()


def clip_tokenizer(current: Any) -> Callable[..., Any]:
    """Keep a tokenizer that is already callable (the Ultralytics fork of CLIP, installed from
    GitHub); otherwise (PyPI's clip-anytorch/openai-clip) use `clip_tokenize`."""
    return current if callable(current) else clip_tokenize


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Sam3Model:
    path: Path
    detector: Any
    """SAM3SemanticModel: backbone, text encoder, detector and mask head (image and video)."""
    tracker: Any | None = None
    """SAM3Model without a backbone: SAM 3's masklet tracker, built on the first clip."""


def checkpoint_keys(path: Path) -> set[str]:
    """The tensor names in a checkpoint, cheaply (memory-mapped where torch can)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a plain zip state dict: read it the way Ultralytics will
        from ultralytics.utils.patches import torch_load

        try:
            checkpoint = torch_load(path, map_location="cpu")
        except Exception as exc:
            raise InvalidInput(f"{path.name} is not a readable PyTorch checkpoint ({exc})") from exc
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict):
        return set()
    return {key for key in checkpoint if isinstance(key, str)}


def _load(path: Path) -> Sam3Model:
    require_packages()
    keys = checkpoint_keys(path)
    if not any(key.startswith("detector.") for key in keys):
        raise InvalidInput(
            f"{path.name} is not a SAM 3 checkpoint (no detector.* weights); "
            f"this task needs {DEFAULT_MODEL} from {HUB_REPO}"
        )
    from ultralytics.models.sam.build_sam3 import build_sam3_image_model

    from core.tasks._yolo import keep_torch_threads

    keep_torch_threads()  # its predictors select the device as YOLO's do
    detector = build_sam3_image_model(str(path))
    # Ultralytics loads with strict=False: a partial file would leave random weights silently.
    missing = [k for k in detector.state_dict() if f"detector.{k}" not in keys]
    if missing:
        raise ModelUnavailable(
            f"{path} is an incomplete SAM 3 checkpoint: {len(missing)} detector tensors are "
            f"missing (first: {missing[0]}); download {DEFAULT_MODEL} again"
        )
    language = detector.backbone.language_backbone
    language.tokenizer = clip_tokenizer(language.tokenizer)
    return Sam3Model(path=path, detector=detector.to(worker_device()).eval())


def ensure_tracker(model: Sam3Model) -> Any:
    """Build the tracker from the same file on first use (call with the model's lock held)."""
    if model.tracker is None:
        from ultralytics.models.sam.build_sam3 import build_interactive_sam3

        tracker = build_interactive_sam3(str(model.path), with_backbone=False)
        model.tracker = tracker.to(worker_device()).eval()
    return model.tracker


def _download(target: Path) -> None:
    """`sam3.pt` from the gated hub repo (needs HF_TOKEN with access), whole or not at all."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    timeout = get_settings().fetch_timeout_s

    def fetch(partial: Path) -> Path:
        partial.mkdir(parents=True, exist_ok=True)
        return Path(
            hf_hub_download(HUB_REPO, DEFAULT_MODEL, local_dir=partial, etag_timeout=timeout)
        )

    # No access, no such file, or offline: retrying cannot help.
    permanent = (
        RepositoryNotFoundError,
        GatedRepoError,
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )
    download_whole(target, fetch, what=DEFAULT_MODEL, permanent=permanent)


def load_sam3(name: str, *, pin: bool = False) -> LoadedModel:
    if PurePosixPath(name).suffix.lower() not in (".pt", ".pth"):
        raise InvalidInput(f"model {name!r}: SAM 3 weights are a .pt file such as {DEFAULT_MODEL}")
    check_model_name(name)
    download = _download if name == DEFAULT_MODEL else None
    hub = HubFile(HUB_REPO, DEFAULT_MODEL) if name == DEFAULT_MODEL else None
    try:
        return get_registry().get(MODEL_KIND, name, _load, download, pin=pin, hub=hub)
    except ModelUnavailable as exc:
        if "looked_in" not in exc.details:  # found but unusable: that message says why
            raise
        # Where it looked and why no download, then SAM 3's own instructions in place of the
        # registry's generic advice.
        where = exc.message.partition(". Put the file in")[0]
        raise ModelUnavailable(f"{where}. {how_to_provide(get_settings())}", **exc.details) from exc


def load(name: str) -> LoadedModel:
    """PRELOAD_MODELS: load and pin the detector and the tracker; on CUDA, run once."""
    loaded = load_sam3(name, pin=True)
    model: Sam3Model = loaded.model
    with loaded.lock:
        ensure_tracker(model)
        device = worker_device()
        if device.startswith("cuda"):  # on CPU a 1008 px pass takes a minute: not worth it
            predictor = image_predictor(model, device, threshold=0.25, iou=0.7, imgsz=NATIVE_IMGSZ)
            predictor.set_image(np.zeros((64, 64, 3), np.uint8))
            predictor(text=["object"])
    return loaded


# --------------------------------------------------------------------------------------------
# Predictors


def predictor_args(device: str, threshold: float, imgsz: int, **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        task="segment",
        mode="predict",
        conf=threshold,
        imgsz=imgsz,
        device=device,
        save=False,
        verbose=False,
        **extra,
    )
    if device.startswith("cuda") and get_settings().half_precision:
        args["quantize"] = 16
    return args


def image_predictor(
    model: Sam3Model, device: str, *, threshold: float, iou: float, imgsz: int
) -> Any:
    from ultralytics.models.sam import SAM3SemanticPredictor

    args = predictor_args(device, threshold, imgsz, iou=iou, model=str(model.path))
    predictor = SAM3SemanticPredictor(overrides=args)
    predictor.setup_model(model=model.detector, verbose=False)
    return predictor


def _video_predictor_class() -> type:
    from ultralytics.models.sam import SAM3SemanticPredictor, SAM3VideoSemanticPredictor

    class ClipPredictor(SAM3VideoSemanticPredictor):
        """SAM 3's video predictor on the worker's loaded models, fed frames one at a time."""

        # BasePredictor.__init__ sets these to None without annotations (mypy infers `None`).
        dataset: Any
        batch: Any

        def __init__(self, model: Sam3Model, overrides: dict[str, Any], **tracking: Any) -> None:
            self._loaded = model
            super().__init__(overrides=overrides, **tracking)

        def setup_model(self, model: Any = None, verbose: bool = True) -> None:
            # The stock one builds both models from the file again on every clip.
            SAM3SemanticPredictor.setup_model(self, model=self._loaded.detector, verbose=verbose)
            self.tracker.setup_model(model=self._loaded.tracker, verbose=False)

        def start(self, pixels: np.ndarray, frame_bound: int) -> None:
            """Size everything from the first frame and open a fresh clip state."""
            self.setup_source(pixels)  # image size, tracker feature sizes
            # What its own video reader would carry: `frame` counts from 1, `frames` bounds
            # the memory lookups (the sampled count is not known before the end).
            self.dataset = types.SimpleNamespace(mode="video", frames=frame_bound, frame=0)
            self.init_state(self)

        def step(self, position: int, pixels: np.ndarray, concepts: list[str]) -> Any:
            """One frame through preprocess, detect-and-track, postprocess -> `Results`."""
            import torch

            self.dataset.frame = position + 1
            self.batch = ([f"frame{position}"], [pixels], [""])
            with torch.inference_mode():
                image = self.preprocess([pixels])
                predictions = self.inference(image, text=concepts)
                return self.postprocess(predictions, image, [pixels])[0]

    return ClipPredictor


# --------------------------------------------------------------------------------------------
# Results


def to_instances(
    result: Any, concepts: list[str], mask_format: str, max_det: int | None = None
) -> list[dict[str, Any]]:
    """Ultralytics `Results` from a SAM 3 predictor -> our detections, best first.

    Box rows are `x1 y1 x2 y2 [id] score class` (the video predictor adds the object id);
    the class indexes `concepts`; masks are boolean at the image's size."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    xyxy = boxes.xyxy.float().cpu().numpy().astype(np.float64)
    scores = boxes.conf.float().cpu().numpy().astype(np.float64)
    classes = boxes.cls.cpu().numpy().astype(int)
    ids = boxes.id.cpu().numpy().astype(int) if boxes.id is not None else None
    masks = result.masks.data.cpu().numpy() > 0.5 if result.masks is not None else None
    height, width = result.orig_shape
    order = np.argsort(-scores, kind="stable")[:max_det]
    instances = []
    for i in order:
        x1, y1, x2, y2 = xyxy[i]
        instance: dict[str, Any] = {
            "box": [
                round(float(np.clip(x1, 0, width)), 2),
                round(float(np.clip(y1, 0, height)), 2),
                round(float(np.clip(x2, 0, width)), 2),
                round(float(np.clip(y2, 0, height)), 2),
            ],
            "confidence": round(float(scores[i]), 4),
            "class_id": int(classes[i]),
            "label": concepts[classes[i]] if 0 <= classes[i] < len(concepts) else str(classes[i]),
        }
        if ids is not None:
            instance["track_id"] = int(ids[i])
        if masks is not None:
            instance["mask"] = encode_mask(masks[i], mask_format)
        instances.append(instance)
    return instances


def count_by_concept(instances: list[dict[str, Any]], concepts: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(concepts, 0)
    for instance in instances:
        counts[instance["label"]] = counts.get(instance["label"], 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# Running


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    assert request.model is not None
    with ctx.timings.measure("load_model"):
        loaded = load_sam3(request.model)
    if is_clip(request):
        return run_clip(request, ctx, loaded)
    return run_images(request, ctx, loaded)


def run_images(request: TaskRequest, ctx: JobContext, loaded: LoadedModel) -> dict[str, Any]:
    options = request.options_as(Sam3Options)
    concepts = options.text_prompt
    out = []
    with loaded.lock:  # the model caches the concepts' text embeddings: one job at a time
        predictor = image_predictor(
            loaded.model,
            ctx.device,
            threshold=options.threshold,
            iou=options.iou,
            imgsz=options.imgsz,
        )
        for index, image in enumerate(request.images):
            with ctx.timings.measure("inference"):
                predictor.set_image(image.pixels)
                result = predictor(text=concepts)[0]
            with ctx.timings.measure("encode"):
                instances = to_instances(result, concepts, options.mask_format, options.max_det)
            item: dict[str, Any] = {
                "index": index,
                "width": image.width,
                "height": image.height,
                "counts": count_by_concept(instances, concepts),
                "detections": instances,
            }
            if request.annotate:
                with ctx.timings.measure("preview"):
                    jpeg = image_to_jpeg(result.plot(line_width=None, pil=False))
                    item["preview"] = ctx.store.put(f"preview_{index}.jpg", jpeg, "image/jpeg")
            out.append(item)
            ctx.progress.update("inference", 100 * (index + 1) / len(request.images))
    return {"concepts": concepts, "imgsz": options.imgsz, "results": out}


def run_clip(request: TaskRequest, ctx: JobContext, loaded: LoadedModel) -> dict[str, Any]:
    options = request.options_as(Sam3Options)
    concepts = options.text_prompt
    info = clip_info(request)
    frames: list[dict[str, Any]] = []
    annotator = ClipAnnotator(ctx, request.annotate, sample_rate(info.fps, options.fps))
    # The annotated video is stored when this block ends, after the lock is released.
    with annotator, loaded.lock:  # tracker state and text embeddings live on the shared models
        with ctx.timings.measure("load_model"):
            ensure_tracker(loaded.model)
        args = predictor_args(
            ctx.device, options.threshold, options.imgsz, model=str(loaded.model.path)
        )
        predictor = _video_predictor_class()(
            loaded.model,
            args,
            score_threshold_detection=options.new_object_threshold,
            max_num_objects=options.max_objects,
        )
        predictor.setup_model(verbose=False)
        sampled = iter_clip_frames(
            request, options, max_side=options.max_side, warnings=ctx.warnings
        )
        for position, frame in enumerate(_timed(sampled, ctx)):
            with ctx.timings.measure("inference"):
                if position == 0:
                    predictor.start(frame.pixels, options.max_frames)
                result = predictor.step(position, frame.pixels, concepts)
            with ctx.timings.measure("encode"):
                instances = to_instances(result, concepts, options.mask_format)
            frames.append({**frame_stamp(frame), "detections": instances})
            annotator.add(frame.pixels, frame.time_s, instances)
            ctx.progress.update(
                "inference",
                100 * len(frames) / options.max_frames,
                f"frame {len(frames)} (source {frame.index})",
            )
    output: dict[str, Any] = {
        "concepts": concepts,
        "imgsz": options.imgsz,
        "video": info.describe(options, len(frames)),
        "tracks": summarise_tracks(frames),
    }
    output.update(per_frame_output(ctx, frames))
    output.update(annotator.output())
    return output


def _timed(frames: Iterator[VideoFrame], ctx: JobContext) -> Iterator[VideoFrame]:
    """Decoding time counted as `decode`, apart from the model's."""
    while True:
        with ctx.timings.measure("decode"):
            frame = next(frames, None)
        if frame is None:
            return
        yield frame


TASK = register(
    Task(
        name="sam3-concept-segmentation",
        options=Sam3Options,
        run=run,
        media=frozenset({"image", "video"}),
        default_model=DEFAULT_MODEL,
        load=load,
        description="SAM 3: every instance of text concepts, with masks; object ids on video",
    )
)
