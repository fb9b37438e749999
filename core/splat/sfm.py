"""Structure-from-Motion with pycolmap: SIFT features, matching and incremental mapping. The
camera files splat trainers read (nerfstudio ``transforms.json``, INRIA ``cameras.json``) are
written from its result by ``core.splat.export``.

Conventions (COLMAP's, kept throughout the result):

* camera axes are OpenCV's: x right, y down, z forward (the camera looks along +z);
* a pose is **world-to-camera**: ``x_cam = R @ x_world + t`` (``SfmImage.rotation``,
  ``SfmImage.translation``); the camera centre in the world is ``C = -R.T @ t``
  (``SfmImage.center``) and camera-to-world is ``[R.T | C]``;
* pixel coordinates put the centre of the top-left pixel at (0.5, 0.5).

The world frame is whatever COLMAP chose (arbitrary origin, rotation and scale): SfM on
images alone cannot know metric scale or which way is up.

pycolmap (4.x) API used here: ``extract_features`` (SIFT, CPU or CUDA), ``match_sequential``
/ ``match_exhaustive`` (+ two-view geometric verification), ``incremental_mapping`` (returns
``{index: Reconstruction}`` and writes each model to ``output_path/index``),
``global_mapping`` (GLOMAP: rotation averaging then global positioning, same return shape),
``Reconstruction.transform(Sim3d)`` (re-framing the kept model, see ``orient``) and
``undistort_images`` for the pinhole copy 3DGS trainers need.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.errors import SfmFailed
from core.naming import natural_key
from core.progress import ProgressReporter

__all__ = [
    "FEATURE_LEVELS",
    "CameraIntrinsics",
    "SfmImage",
    "SfmResult",
    "list_images",
    "orientation",
    "result_from_reconstruction",
    "run_sfm",
    "undistort_to_pinhole",
]

log = logging.getLogger("worker.sfm")

Matching = Literal["sequential", "exhaustive", "auto"]
Mapper = Literal["incremental", "global", "auto"]
FeatureLevel = Literal["low", "medium", "high"]
Orient = Literal["none", "z_up", "y_up"]
# SIFT features kept per image for each `features` level of a request.
FEATURE_LEVELS: dict[str, int] = {"low": 2048, "medium": 8192, "high": 16384}
# auto: the global mapper from here on. bench/bench_mapper.py on the 2-core CPU: at 32 and
# 120 frames incremental mapping was the faster (1.5 vs 4.2 s, 77 vs 137 s), global the more
# accurate; incremental's cost grows faster with frames (each registration re-adjusts the
# model), so global is for long captures only. Not measured above 120 frames yet.
GLOBAL_AUTO_MIN_IMAGES = 200
# The global mapper's model is kept only when it registers at least this share of the
# frames; otherwise incremental mapping runs on the same matches (the result says so).
GLOBAL_KEEP_FRACTION = 0.9
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXHAUSTIVE_MAX_IMAGES = 40  # auto: exhaustive is O(n^2) pairs, affordable up to about here
MIN_IMAGES = 3  # fewer views cannot give a model that is checked by a third view
# A model with fewer 3D points is degenerate: real models have hundreds per image, while a
# camera that only turns in place yields models of 0-5 points (measured).
MIN_POINTS = 50
MIN_POINTS_PER_IMAGE = 5

# Share of the stage's 0-100 progress each step takes (mapping is the long one on CPU).
_EXTRACT_SPAN = (0.0, 30.0)
_MATCH_SPAN = (30.0, 50.0)
_MAP_SPAN = (50.0, 100.0)

# Hints that make an SfmFailed actionable; the message names the numbers behind them.
HINT_CAPTURE = (
    "the camera needs to move around the subject with overlap between frames; avoid blank "
    "walls, reflective or moving subjects and motion blur; try a higher fps or a longer clip"
)
HINT_TOO_FEW = (
    "SfM needs at least 3 overlapping views (a splat wants dozens): use a longer clip or a "
    "higher fps, or send more photos"
)
HINT_STILL = (
    "the frames match each other but show little or no parallax: the camera seems to stand "
    "still or only turn in place (tripod, pan), so depth cannot be triangulated"
)
HINT_TEXTURE = (
    "the frames have almost no texture for SIFT features (blank walls, darkness, fog, heavy blur)"
)


@dataclass(frozen=True)
class CameraIntrinsics:
    """A COLMAP camera: the model name and its raw params, plus the pinhole part spelled out."""

    model: str  # COLMAP model name: SIMPLE_RADIAL, PINHOLE, OPENCV, ...
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    params: tuple[float, ...]  # COLMAP's own order, e.g. (f, cx, cy, k) for SIMPLE_RADIAL

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def distortion(self) -> dict[str, float]:
        """Distortion in nerfstudio's OPENCV terms (k1, k2, p1, p2); zeros for pinholes."""
        p = self.params
        if self.model in ("SIMPLE_PINHOLE", "PINHOLE"):
            return {"k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0}
        if self.model == "SIMPLE_RADIAL":
            return {"k1": p[3], "k2": 0.0, "p1": 0.0, "p2": 0.0}
        if self.model == "RADIAL":
            return {"k1": p[3], "k2": p[4], "p1": 0.0, "p2": 0.0}
        if self.model == "OPENCV":
            return {"k1": p[4], "k2": p[5], "p1": p[6], "p2": p[7]}
        raise ValueError(
            f"camera model {self.model} has no OPENCV equivalent; undistort to pinhole first"
        )


@dataclass(frozen=True)
class SfmImage:
    """One registered image. The pose is world-to-camera (COLMAP's): x_cam = R x_world + t."""

    name: str  # file name relative to the image folder
    image_id: int
    camera_id: int
    rotation: np.ndarray  # [3, 3] float64, world-to-camera R
    translation: np.ndarray  # [3] float64, world-to-camera t
    center: np.ndarray  # [3] float64, camera centre in world coordinates: -R^T t
    intrinsics: CameraIntrinsics

    @property
    def world_to_camera(self) -> np.ndarray:
        """4x4 [R | t]: world point to OpenCV camera coordinates."""
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.rotation, self.translation
        return m

    @property
    def camera_to_world(self) -> np.ndarray:
        """4x4 [R^T | C]: OpenCV camera axes (x right, y down, z forward) in the world."""
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.rotation.T, self.center
        return m


@dataclass
class SfmResult:
    images: list[SfmImage]  # registered images, sorted by name
    total_images: int  # images given to SfM (registered or not)
    points_xyz: np.ndarray  # [N, 3] float32, world coordinates
    points_rgb: np.ndarray  # [N, 3] uint8
    points_error: np.ndarray  # [N] float32, mean reprojection error of each point (px)
    points_track_length: np.ndarray  # [N] int32, images observing each point
    mean_reprojection_error: float  # px, over all observations of the kept model
    model_dir: Path | None = None  # the kept model in COLMAP's binary format
    num_models: int = 1  # models COLMAP produced (the largest is kept)
    timings_ms: dict[str, float] = field(default_factory=dict)
    mapper: dict[str, Any] = field(default_factory=dict)  # which mapper ran, any fallback
    # The world frame: new_from_colmap [3, 4] applied to COLMAP's world (identity when not
    # oriented), the orient setting, and the estimated up direction in this result's frame.
    applied_transform: np.ndarray = field(default_factory=lambda: np.eye(4)[:3])
    orient: str = "none"
    up: np.ndarray | None = None

    @property
    def registered_names(self) -> list[str]:
        return [image.name for image in self.images]

    @property
    def num_registered(self) -> int:
        return len(self.images)

    @property
    def num_points(self) -> int:
        return int(self.points_xyz.shape[0])

    @property
    def registered_fraction(self) -> float:
        return self.num_registered / self.total_images if self.total_images else 0.0

    def stats(self) -> dict[str, Any]:
        """JSON-ready statistics for a job's result."""
        return {
            "registered_images": self.num_registered,
            "total_images": self.total_images,
            "registered_fraction": round(self.registered_fraction, 4),
            "points": self.num_points,
            "mean_reprojection_error_px": round(self.mean_reprojection_error, 4),
            "models": self.num_models,
            **({"mapper": self.mapper} if self.mapper else {}),
            "orient": self.orient,
            "up": None if self.up is None else [round(float(v), 6) for v in self.up],
            "applied_transform": np.round(self.applied_transform, 8).tolist(),
        }


# --------------------------------------------------------------------------------------------
# Reading a pycolmap Reconstruction


def _intrinsics(camera: Any) -> CameraIntrinsics:
    return CameraIntrinsics(
        model=str(camera.model_name),
        width=int(camera.width),
        height=int(camera.height),
        fx=float(camera.focal_length_x),
        fy=float(camera.focal_length_y),
        cx=float(camera.principal_point_x),
        cy=float(camera.principal_point_y),
        params=tuple(float(p) for p in camera.params),
    )


def result_from_reconstruction(
    reconstruction: Any, total_images: int, model_dir: Path | None = None, num_models: int = 1
) -> SfmResult:
    """Copy what callers need out of a ``pycolmap.Reconstruction`` into plain numpy."""
    cameras = {cid: _intrinsics(cam) for cid, cam in reconstruction.cameras.items()}
    images = []
    for image_id in reconstruction.reg_image_ids():
        image = reconstruction.image(image_id)
        pose = image.cam_from_world()  # a method in pycolmap >= 3.12 (rigs and frames)
        rot = np.asarray(pose.rotation.matrix(), dtype=np.float64)
        trans = np.asarray(pose.translation, dtype=np.float64).reshape(3)
        images.append(
            SfmImage(
                name=str(image.name),
                image_id=int(image_id),
                camera_id=int(image.camera_id),
                rotation=rot,
                translation=trans,
                center=-rot.T @ trans,
                intrinsics=cameras[image.camera_id],
            )
        )
    images.sort(key=lambda im: natural_key(im.name))
    points = list(reconstruction.points3D.values())
    return SfmResult(
        images=images,
        total_images=total_images,
        points_xyz=np.array([p.xyz for p in points], np.float32).reshape(-1, 3),
        points_rgb=np.array([p.color for p in points], np.uint8).reshape(-1, 3),
        points_error=np.array([p.error for p in points], np.float32),
        points_track_length=np.array([p.track.length() for p in points], np.int32),
        mean_reprojection_error=float(reconstruction.compute_mean_reprojection_error()),
        model_dir=model_dir,
        num_models=num_models,
    )


# --------------------------------------------------------------------------------------------
# Running SfM


def list_images(image_dir: Path) -> list[str]:
    """The JPEG/PNG file names in ``image_dir``, in natural order (frame_2 before frame_10)."""
    if not image_dir.is_dir():
        return []
    names = [
        p.name for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(names, key=natural_key)


def _default_threads() -> int:
    # sched_getaffinity respects CPU pinning (containers), unlike os.cpu_count().
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _quiet_colmap_logging(pycolmap: Any, verbose: bool) -> None:
    # glog's default writes a log file per process into /tmp; a worker logs to stderr only,
    # and COLMAP's INFO lines (several per image) only when asked.
    pycolmap.logging.logtostderr = True
    pycolmap.logging.minloglevel = 0 if verbose else 1


def _image_sizes(image_dir: Path, names: list[str]) -> set[tuple[int, int]]:
    from PIL import Image

    sizes = set()
    for name in names:
        with Image.open(image_dir / name) as img:  # reads the header only
            sizes.add(img.size)
    return sizes


class _Progress:
    """Maps SfM steps into the stage's 0-100 range; a no-op without a reporter."""

    def __init__(self, reporter: ProgressReporter | None, stage: str) -> None:
        self.reporter = reporter
        self.stage = stage
        self.best = 0.0

    def __call__(
        self, span: tuple[float, float], fraction: float, message: str, **extra: Any
    ) -> None:
        if self.reporter is None:
            return
        value = span[0] + (span[1] - span[0]) * min(1.0, max(0.0, fraction))
        self.best = max(self.best, value)  # never go backwards (a second model restarts counts)
        self.reporter.update(self.stage, self.best, message, **extra)


def _diagnose(pycolmap: Any, database: Path, motion: bool = False) -> dict[str, float]:
    """Numbers that explain a failure: features per image, verified image pairs and (with
    ``motion``) the share of those pairs whose geometry shows no camera translation."""
    with pycolmap.Database.open(str(database)) as db:
        n_images = max(1, db.num_images())
        # num_verified_image_pairs() counts every verification attempt, failed ones too;
        # this lists only the pairs that kept inliers.
        pair_ids, _ = db.read_two_view_geometry_num_inliers()
        diag: dict[str, float] = {
            "mean_features_per_image": round(db.num_keypoints() / n_images, 1),
            "verified_pairs": len(pair_ids),
        }
        if motion and pair_ids:
            # Pairs related by a homography of the whole view (a pure rotation) or by no
            # motion at all (COLMAP calls a static match a watermark) cannot be triangulated.
            config = pycolmap.TwoViewGeometryConfiguration
            still = {
                int(config.PANORAMIC),
                int(config.PLANAR_OR_PANORAMIC),
                int(config.WATERMARK),
            }
            _, geometries = db.read_two_view_geometries()
            n_still = sum(int(g.config) in still for g in geometries)
            diag["rotation_only_pair_fraction"] = round(n_still / max(1, len(geometries)), 3)
    return diag


def _failure_hint(diag: dict[str, float]) -> str:
    if diag["mean_features_per_image"] < 100:
        return f"{HINT_TEXTURE}; {HINT_CAPTURE}"
    if diag.get("rotation_only_pair_fraction", 0.0) >= 0.8:
        return f"{HINT_STILL}; {HINT_CAPTURE}"
    return HINT_CAPTURE


def _usable(model: Any) -> bool:
    return model.num_points3D() >= max(MIN_POINTS, MIN_POINTS_PER_IMAGE * model.num_reg_images())


@dataclass(frozen=True)
class _Run:
    """What every SfM step shares: the images, the database and the compute settings."""

    pycolmap: Any
    image_dir: Path
    names: list[str]
    database: Path
    threads: int
    gpu: bool
    seed: int
    report: _Progress

    @property
    def total(self) -> int:
        return len(self.names)

    @property
    def device(self) -> Any:
        return self.pycolmap.Device.cuda if self.gpu else self.pycolmap.Device.cpu


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Record the step's wall time in ms (only when it completes: a failure has no timings)."""
    t0 = time.perf_counter()
    yield
    timings[step] = (time.perf_counter() - t0) * 1000


def _require_enough_images(total: int) -> None:
    if total < MIN_IMAGES:
        raise SfmFailed(
            f"only {total} frame(s) to reconstruct from: {HINT_TOO_FEW}",
            registered=0,
            total=total,
        )


def _matching_mode(matching: Matching, total: int) -> Literal["sequential", "exhaustive"]:
    if matching not in ("sequential", "exhaustive", "auto"):
        raise ValueError(f"matching must be sequential, exhaustive or auto, got {matching!r}")
    if matching == "auto":
        return "exhaustive" if total <= EXHAUSTIVE_MAX_IMAGES else "sequential"
    return matching


def _gpu_wanted(pycolmap: Any, use_gpu: bool | None) -> bool:
    """CUDA when asked for (None: whenever pycolmap has it) and pycolmap was built with it."""
    gpu = pycolmap.has_cuda if use_gpu is None else (use_gpu and pycolmap.has_cuda)
    if use_gpu and not pycolmap.has_cuda:
        log.warning("pycolmap was built without CUDA; SIFT runs on the CPU")
    return gpu


def _extract_features(
    run: _Run,
    *,
    camera_model: str,
    single_camera: bool,
    max_image_side: int,
    max_features: int,
    camera_groups: list[list[str]] | None = None,
    mask_dir: Path | None = None,
) -> None:
    """SIFT features into the database, in chunks so a long extraction reports progress;
    later chunks reuse the first chunk's camera when all images share one. With
    `camera_groups` (image names, one list per source video) each group shares one camera.
    With `mask_dir`, COLMAP reads ``mask_dir/<image name>.png`` for each image and keeps no
    feature where that mask is 0."""
    pycolmap, total = run.pycolmap, run.total
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    if mask_dir is not None:
        reader.mask_path = str(mask_dir)
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = run.threads
    extraction.max_image_size = max_image_side
    extraction.use_gpu = run.gpu
    extraction.sift.max_num_features = max_features
    shared = single_camera or camera_groups is not None
    camera_mode = pycolmap.CameraMode.SINGLE if shared else pycolmap.CameraMode.PER_IMAGE
    chunk = max(8, -(-total // 10))
    run.report(_EXTRACT_SPAN, 0.0, f"extracting features from {total} images", sfm_step="features")
    done = 0
    for group in camera_groups or [run.names]:
        reader.existing_camera_id = -1  # the group's first chunk makes its camera
        for start in range(0, len(group), chunk):
            pycolmap.extract_features(
                run.database,
                run.image_dir,
                image_names=group[start : start + chunk],
                camera_mode=camera_mode,
                reader_options=reader,
                extraction_options=extraction,
                device=run.device,
            )
            if shared and start == 0:
                with pycolmap.Database.open(str(run.database)) as db:
                    reader.existing_camera_id = max(c.camera_id for c in db.read_all_cameras())
            done += len(group[start : start + chunk])
            run.report(
                _EXTRACT_SPAN, done / total, f"features: {done}/{total} images", sfm_step="features"
            )


def _require_features(run: _Run) -> None:
    diag = _diagnose(run.pycolmap, run.database)
    if diag["mean_features_per_image"] < 1:
        raise SfmFailed(
            f"no features found in {run.total} frames: {HINT_TEXTURE}; {HINT_CAPTURE}",
            registered=0,
            total=run.total,
            **diag,
        )


def _match(run: _Run, mode: Literal["sequential", "exhaustive"], sequential_overlap: int) -> None:
    """Match features between image pairs, with two-view geometric verification."""
    pycolmap = run.pycolmap
    run.report(_MATCH_SPAN, 0.0, f"matching features ({mode})", sfm_step="matching")
    match_options = pycolmap.FeatureMatchingOptions()
    match_options.num_threads = run.threads
    match_options.use_gpu = run.gpu
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = run.seed
    if mode == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = sequential_overlap
        pairing.quadratic_overlap = True  # also i + 2^k, k < overlap: re-finds far views
        pairing.loop_detection = False  # needs a vocabulary tree file we do not ship
        pairing.num_threads = run.threads
        pycolmap.match_sequential(
            run.database,
            matching_options=match_options,
            pairing_options=pairing,
            verification_options=verification,
            device=run.device,
        )
    else:
        pycolmap.match_exhaustive(
            run.database,
            matching_options=match_options,
            verification_options=verification,
            device=run.device,
        )


def _require_pairs(run: _Run) -> None:
    """Mapping cannot start without a verified pair: say so without trying."""
    diag = _diagnose(run.pycolmap, run.database)
    if diag["verified_pairs"] == 0:
        raise SfmFailed(
            f"no two of the {run.total} frames could be matched "
            f"({diag['mean_features_per_image']:.0f} features per frame): "
            f"{_failure_hint(diag)}",
            registered=0,
            total=run.total,
            models=0,
            **diag,
        )
    run.report(
        _MATCH_SPAN, 1.0, f"{diag['verified_pairs']} image pairs matched", sfm_step="matching"
    )


def _map(run: _Run, sparse: Path) -> dict[int, Any]:
    """Incremental mapping into ``sparse/<i>/``; progress per registered image through
    COLMAP's callbacks. Returns COLMAP's ``{index: Reconstruction}``."""
    pycolmap, total, seed = run.pycolmap, run.total, run.seed
    options = pycolmap.IncrementalPipelineOptions()
    options.num_threads = run.threads
    options.random_seed = seed
    options.mapper.num_threads = run.threads
    options.mapper.random_seed = seed
    options.triangulation.random_seed = seed
    # Keep small models too (default 10), so a failure can say how many registered.
    options.min_model_size = MIN_IMAGES
    registered = [0]

    def on_initial_pair() -> None:
        registered[0] = 2
        run.report(_MAP_SPAN, 2 / total, f"registered 2/{total} images", sfm_step="mapping")

    def on_next_image() -> None:
        registered[0] += 1
        n = min(registered[0], total)
        run.report(_MAP_SPAN, n / total, f"registered {n}/{total} images", sfm_step="mapping")

    run.report(_MAP_SPAN, 0.0, "finding an initial image pair", sfm_step="mapping")
    sparse.mkdir()
    return pycolmap.incremental_mapping(
        run.database,
        run.image_dir,
        sparse,
        options,
        initial_image_pair_callback=on_initial_pair,
        next_image_callback=on_next_image,
    )


def _map_global(run: _Run, sparse: Path) -> dict[int, Any]:
    """Global mapping (GLOMAP) into ``sparse/<i>/``: no per-image callbacks, so progress
    only at its start and end."""
    pycolmap, seed = run.pycolmap, run.seed
    options = pycolmap.GlobalPipelineOptions()
    options.num_threads = run.threads
    options.random_seed = seed
    options.mapper.num_threads = run.threads
    options.mapper.random_seed = seed
    options.min_model_size = MIN_IMAGES
    run.report(_MAP_SPAN, 0.0, "global mapping (rotation averaging)", sfm_step="mapping")
    sparse.mkdir()
    return pycolmap.global_mapping(run.database, run.image_dir, sparse, options)


def _mapper_choice(mapper: Mapper, total: int) -> Literal["incremental", "global"]:
    if mapper not in ("incremental", "global", "auto"):
        raise ValueError(f"mapper must be incremental, global or auto, got {mapper!r}")
    if mapper == "auto":
        return "global" if total >= GLOBAL_AUTO_MIN_IMAGES else "incremental"
    return mapper


def _map_with_fallback(
    run: _Run, sparse: Path, mapper: Mapper, timings: dict[str, float]
) -> tuple[dict[int, Any], int, Any | None, dict[str, Any]]:
    """Map with the chosen mapper; a global model that registers fewer than
    GLOBAL_KEEP_FRACTION of the frames (or none usable, or an error) is dropped for
    incremental mapping on the same matches. Returns the models, the best, and the report."""
    chosen = _mapper_choice(mapper, run.total)
    report: dict[str, Any] = {"requested": mapper, "used": chosen, "fallback": False}
    if chosen == "global":
        reason = None
        t0 = time.perf_counter()
        try:
            models = _map_global(run, sparse)
        except Exception as exc:  # GLOMAP raises on graphs it cannot average; be incremental
            models, reason = {}, f"global mapping failed: {exc}"
        timings["map_global"] = (time.perf_counter() - t0) * 1000
        best_index, best = _best_model(models)
        n_reg = best.num_reg_images() if best is not None else 0
        if reason is None and n_reg < GLOBAL_KEEP_FRACTION * run.total:
            reason = (
                f"global mapping registered {n_reg}/{run.total} frames "
                f"(< {GLOBAL_KEEP_FRACTION:.0%})"
            )
        if reason is None:
            report["global_registered"] = n_reg
            return models, best_index, best, report
        log.info("%s; mapping incrementally instead", reason)
        report.update(used="incremental", fallback=True, reason=reason, global_registered=n_reg)
        shutil.rmtree(sparse, ignore_errors=True)
    with _timed(timings, "map_incremental"):
        models = _map(run, sparse)
    best_index, best = _best_model(models)
    return models, best_index, best, report


def orientation(result: SfmResult, orient: Orient) -> tuple[np.ndarray, np.ndarray]:
    """``(new_from_old [3, 4], up)``: the rigid transform that puts the estimated up on +Z
    (``z_up``) or +Y (``y_up``) and the camera centres' centroid at the origin (identity
    for ``none``), and the up direction in the old frame.

    Up is the normal of the plane the camera centres lie near (an orbit, a walk around),
    signed to agree with the cameras' mean up vector (-y of OpenCV camera axes: people hold
    cameras level); where the centres are not planar (a line, a cloud) or too few, it is the
    mean up vector itself (biased by as much as the camera looks down or up on average)."""
    if orient not in ("none", "z_up", "y_up"):
        raise ValueError(f"orient must be none, z_up or y_up, got {orient!r}")
    centres = np.array([im.center for im in result.images], np.float64).reshape(-1, 3)
    cam_up = np.array([-im.rotation[1] for im in result.images], np.float64).reshape(-1, 3)
    mean_up = cam_up.sum(axis=0)
    mean_up = mean_up / max(np.linalg.norm(mean_up), 1e-12)
    up = mean_up
    if len(centres) >= 4:
        _u, sig, vt = np.linalg.svd(centres - centres.mean(axis=0), full_matrices=False)
        # Planar: the thinnest spread well under the second, which is not itself thin (a
        # line has no plane); and the plane must face roughly along the cameras' up (a walk
        # along a wall, up and down stairs, is planar too, but vertical).
        normal = vt[2] * np.sign(vt[2] @ mean_up or 1.0)
        planar = sig[2] < 0.25 * sig[1] and sig[1] > 0.2 * sig[0]
        if planar and normal @ mean_up > np.cos(np.radians(45)):
            up = normal
    if orient == "none":
        return np.eye(4)[:3], up
    target = np.array([0.0, 0.0, 1.0]) if orient == "z_up" else np.array([0.0, 1.0, 0.0])
    rot = _rotation_between(up, target)
    centroid = centres.mean(axis=0)
    return np.concatenate([rot, (-rot @ centroid)[:, None]], axis=1), up


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector ``a`` to unit vector ``b`` (Rodrigues)."""
    v, c = np.cross(a, b), float(a @ b)
    if c < -1 + 1e-9:  # opposite: half a turn about any axis perpendicular to a
        axis = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(axis) < 1e-6:
            axis = np.cross(a, [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def _orient_model(pycolmap: Any, model: Any, result: SfmResult, orient: Orient) -> np.ndarray:
    """Move ``model`` (in place) into the oriented frame; returns the applied [3, 4] and sets
    nothing else. Applied to COLMAP's model itself, before it is written, so the model on
    disk, the undistorted copy, the points the Gaussians start from and hence the trained
    splat all share one frame: no later step has to transform anything."""
    matrix, _up = orientation(result, orient)
    if orient != "none":
        model.transform(pycolmap.Sim3d(matrix))
    return matrix


def _best_model(models: dict[int, Any]) -> tuple[int, Any | None]:
    """The largest usable model: most registered images, then most points. A model with
    almost no points is degenerate (e.g. a camera that only turns registers frames on
    rotation alone), however many frames it holds. ``(-1, None)`` when none is usable."""
    usable = {i: m for i, m in models.items() if _usable(m)}
    return max(
        usable.items(),
        key=lambda kv: (kv[1].num_reg_images(), kv[1].num_points3D()),
        default=(-1, None),
    )


def _require_registered(
    run: _Run, models: dict[int, Any], best: Any | None, min_registered_fraction: float
) -> None:
    """Raise `SfmFailed`, saying what came out and why, unless ``best`` registers enough."""
    total = run.total
    n_reg = best.num_reg_images() if best is not None else 0
    if n_reg >= max(MIN_IMAGES, min_registered_fraction * total):
        return
    diag = _diagnose(run.pycolmap, run.database, motion=True)
    if best is not None:
        split = f", split into {len(models)} models" if len(models) > 1 else ""
        what = f"only {n_reg} of {total} frames registered{split}"
    elif models:
        largest = max(models.values(), key=lambda m: m.num_reg_images())
        what = (
            f"no usable 3D model from {total} frames (the largest registered "
            f"{largest.num_reg_images()} frames but triangulated only "
            f"{largest.num_points3D()} point(s))"
        )
    else:
        what = f"no 3D model could be built from {total} frames"
    raise SfmFailed(
        f"{what} ({diag['mean_features_per_image']:.0f} features per frame, "
        f"{diag['verified_pairs']} matched pairs): {_failure_hint(diag)}",
        registered=n_reg,
        total=total,
        models=len(models),
        **diag,
    )


def _write_model(model: Any, model_dir: Path, force: bool = False) -> None:
    if force or not (model_dir / "images.bin").exists():  # write it if COLMAP did not
        model_dir.mkdir(parents=True, exist_ok=True)
        model.write(model_dir)


def run_sfm(
    image_dir: Path,
    work_dir: Path,
    *,
    matching: Matching = "auto",
    progress: ProgressReporter | None = None,
    max_image_side: int = 1600,
    max_features: int = 8192,
    mapper: Mapper = "incremental",
    orient: Orient = "none",
    min_registered_fraction: float = 0.5,
    camera_model: str = "SIMPLE_RADIAL",
    single_camera: bool | None = None,
    camera_groups: list[list[str]] | None = None,
    sequential_overlap: int = 10,
    num_threads: int | None = None,
    use_gpu: bool | None = None,
    seed: int = 0,
    stage: str = "running_colmap",
    verbose: bool = False,
    mask_dir: Path | None = None,
) -> SfmResult:
    """SIFT features -> matching -> incremental mapping on the images in ``image_dir``.

    Writes only inside ``work_dir`` (``database.db`` and ``sparse/<i>/``); on failure those
    are removed again (``work_dir`` itself stays, empty). Returns the largest usable model
    (one with real structure: at least 50 points and 5 per image); raises `SfmFailed` with
    a hint and the numbers behind it when no such model comes out or fewer than
    ``min_registered_fraction`` of the images register in it.

    * ``matching``: "sequential" (video: each frame against the next ``sequential_overlap``
      ones, then quadratically further ones; loop detection off, which needs a vocabulary
      tree file), "exhaustive" (every pair: small photo sets) or "auto" (exhaustive up to
      40 images, else sequential).
    * ``single_camera``: one camera (intrinsics) shared by all images, right for video;
      None picks it when all images have the same size. Pass False for photos taken with
      different cameras or zoom settings.
    * ``camera_groups``: image names, one list per camera (a source video each); every
      image in one list shares one camera, whatever ``single_camera`` says.
    * ``camera_model``: COLMAP model name; SIMPLE_RADIAL (f, cx, cy, k) suits most phone
      footage, PINHOLE skips distortion.
    * ``mapper``: "incremental" (COLMAP's), "global" (GLOMAP; falls back to incremental
      when it registers under 90 % of the frames) or "auto" (global from 200 frames).
      ``result.mapper`` says which ran and why any fallback happened.
    * ``orient``: "none" keeps COLMAP's arbitrary world; "z_up" / "y_up" rotate the
      estimated up (see `orientation`) onto +Z / +Y and move the camera centroid to the
      origin, recorded in ``result.applied_transform`` (new_from_colmap, 3x4).
    * ``mask_dir``: a folder with ``<image name>.png`` per image (e.g. ``frame_000001.png.png``;
      COLMAP's feature masks): no features are extracted where its pixels are 0, so a moving
      subject cannot drive the solve. None: features everywhere.
    """
    import pycolmap

    started = time.perf_counter()
    image_dir, work_dir = Path(image_dir), Path(work_dir)
    names = list_images(image_dir)
    total = len(names)
    _require_enough_images(total)
    mode = _matching_mode(matching, total)
    if single_camera is None:
        single_camera = len(_image_sizes(image_dir, names)) == 1
    run = _Run(
        pycolmap=pycolmap,
        image_dir=image_dir,
        names=names,
        database=work_dir / "database.db",
        threads=num_threads or _default_threads(),
        gpu=_gpu_wanted(pycolmap, use_gpu),
        seed=seed,
        report=_Progress(progress, stage),
    )
    sparse = work_dir / "sparse"
    timings: dict[str, float] = {}

    work_dir.mkdir(parents=True, exist_ok=True)
    # A database from an earlier run would make COLMAP skip the images it already holds.
    _remove(run.database, sparse)
    _quiet_colmap_logging(pycolmap, verbose)
    pycolmap.set_random_seed(seed)
    try:
        with _timed(timings, "extract"):
            _extract_features(
                run,
                camera_model=camera_model,
                single_camera=single_camera,
                max_image_side=max_image_side,
                max_features=max_features,
                camera_groups=camera_groups,
                mask_dir=mask_dir,
            )
        _require_features(run)
        with _timed(timings, "match"):
            _match(run, mode, sequential_overlap)
        _require_pairs(run)
        with _timed(timings, "map"):
            models, best_index, best, mapper_report = _map_with_fallback(
                run, sparse, mapper, timings
            )
        _require_registered(run, models, best, min_registered_fraction)
        model_dir = sparse / str(best_index)
        applied = _orient_model(pycolmap, best, result_from_reconstruction(best, total), orient)
        _write_model(best, model_dir, force=orient != "none")
        result = result_from_reconstruction(best, total, model_dir, num_models=len(models))
        result.mapper, result.orient, result.applied_transform = mapper_report, orient, applied
        # Rounded so an oriented scene's up reads exactly [0, 0, 1], not 1e-16 off.
        result.up = np.round(orientation(result, "none")[1], 9) + 0.0
    except BaseException:
        _remove(run.database, sparse)  # nothing half-made stays behind
        raise
    timings["total"] = (time.perf_counter() - started) * 1000
    result.timings_ms = {k: round(v, 1) for k, v in timings.items()}
    run.report(
        _MAP_SPAN,
        1.0,
        f"registered {result.num_registered}/{total} images, {result.num_points} points",
        sfm_step="done",
    )
    return result


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    # SQLite may leave its journal files next to the database.
    for path in paths:
        for extra in (
            path.with_name(path.name + "-journal"),
            path.with_name(path.name + "-wal"),
            path.with_name(path.name + "-shm"),
        ):
            if extra.exists():
                extra.unlink()


def undistort_to_pinhole(
    result: SfmResult,
    image_dir: Path,
    out_dir: Path,
    *,
    max_image_side: int | None = None,
    num_threads: int | None = None,
) -> SfmResult:
    """Undistorted copies of the registered images and a PINHOLE model, as 3DGS trainers
    (gsplat, INRIA) expect: ``out_dir/images/<name>`` and ``out_dir/sparse/`` (COLMAP
    binary). Poses are unchanged; intrinsics become pinhole, the image size may change."""
    import pycolmap

    if result.model_dir is None:
        raise ValueError("the result has no model_dir to undistort")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = pycolmap.UndistortCameraOptions()
    if max_image_side:
        options.max_image_size = max_image_side
    pycolmap.undistort_images(
        out_dir,
        result.model_dir,
        Path(image_dir),
        image_names=result.registered_names,
        output_type="COLMAP",
        undistort_options=options,
        num_threads=num_threads or _default_threads(),
    )
    reconstruction = pycolmap.Reconstruction(out_dir / "sparse")
    undistorted = result_from_reconstruction(
        reconstruction, result.total_images, out_dir / "sparse", result.num_models
    )
    undistorted.timings_ms = dict(result.timings_ms)
    undistorted.mapper, undistorted.orient = result.mapper, result.orient
    undistorted.applied_transform, undistorted.up = result.applied_transform, result.up
    return undistorted
