"""Camera solve on a clip with the moving subject masked out (Orbit, VFX camera tracking).

A creator filmed while walking with the camera sits nearly still in the image: if SIFT sees
the subject, its features agree with a camera that does not move and pull the solve towards
it (or split it). Each frame's subject mask is dilated (the mask's edge pixels still carry
the subject's texture) and handed to COLMAP as a feature mask, so only the static scene
drives the poses. The solve itself is `core.splat.sfm.run_sfm` (one camera for the clip,
sequential matching, incremental mapping); this stage adds what the apps read per frame:
a pose or a flag for every input frame, per-frame reprojection error and image coverage,
and the pose-quality metrics Orbit's old backend reported (`pose_quality`).

Conventions are COLMAP's (see `core.splat.sfm`): OpenCV camera axes, ``world_to_camera`` is
``x_cam = R x_world + t``, ``camera_to_world`` is ``[R^T | C]`` (Orbit's T_world_from_cam,
right-handed, row-major). The world frame and its scale are COLMAP's arbitrary ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.control import cancel_requested
from core.errors import Cancelled, InvalidInput
from core.progress import CallbackReporter
from core.splat.sfm import Mapper, Matching, SfmResult, run_sfm

__all__ = [
    "QUALITY_FEATURES",
    "CameraSolve",
    "FramePose",
    "pose_quality",
    "scene_median_depth",
    "solve_camera",
]

Progress = Callable[[float, str], None]

# The VFX platform's SIFT presets: features kept per frame.
QUALITY_FEATURES: dict[str, int] = {"low": 2048, "medium": 8192, "high": 16384}
FRAME_PATTERN = "frame_{:06d}.png"
_FRAME_NAME = re.compile(r"frame_(\d+)\.png$")
CANCEL_MESSAGE = "the job was cancelled (or ran past its execution timeout)"
# A quadrant counts as covered when at least this many of the frame's 3D observations lie in
# it: one stray point says nothing about how well the image constrains the pose.
QUADRANT_MIN_POINTS = 5
GOOD_COVERAGE_QUADRANTS = 3  # Orbit's rule: a frame is well covered with >= 3 quadrants
# pose_quality's score: reprojection error at or under this is perfect, at REPROJ_BAD_PX nil.
REPROJ_GOOD_PX = 1.0
REPROJ_BAD_PX = 4.0
# Writing the frames and masks, COLMAP, then reading the model back: shares of the stage.
_WRITE_SPAN = (0.0, 0.05)
_SFM_SPAN = (0.05, 0.95)
_REPORT_EVERY = 8  # frames between progress calls while writing


@dataclass
class FramePose:
    frame: int  # position in the clip (0..F-1)
    registered: bool
    world_to_camera: np.ndarray | None  # 4x4, COLMAP convention (x_cam = R x_world + t)
    camera_to_world: np.ndarray | None  # 4x4 (Orbit PRD: T_world_from_cam)
    reprojection_error: float | None  # mean px over this image's observations
    num_points: int  # observed 3D points
    quadrants: list[bool]  # TL, TR, BL, BR: which image quadrants hold its observations
    num_keypoints: int = 0  # SIFT keypoints extracted (outside the mask)
    num_matched_keypoints: int = 0  # keypoints in at least one geometrically verified match

    @property
    def centre(self) -> np.ndarray | None:
        return None if self.camera_to_world is None else self.camera_to_world[:3, 3]


@dataclass
class CameraSolve:
    width: int
    height: int
    intrinsics: dict[str, Any]  # model, fx, fy, cx, cy, params (COLMAP order), distortion
    poses: list[FramePose]  # one per input frame, registered or flagged
    points: np.ndarray  # [m, 3] float64 sparse points (world)
    point_errors: np.ndarray  # [m] mean reprojection error of each point (px)
    sfm: SfmResult
    # frame -> indices into `points` of the 3D points that frame observes.
    observed_points: dict[int, np.ndarray] = field(default_factory=dict)
    # ms per step: write (frames and masks), run_sfm's (extract, match, map, ...), read, total.
    timings_ms: dict[str, float] = field(default_factory=dict)

    def registered_fraction(self) -> float:
        if not self.poses:
            return 0.0
        return sum(p.registered for p in self.poses) / len(self.poses)

    def median_reprojection_error(self) -> float:
        """Median over registered frames of each frame's mean reprojection error (px)."""
        errors = [p.reprojection_error for p in self.poses if p.reprojection_error is not None]
        return float(np.median(errors)) if errors else float("nan")


def _sfm_progress(callback: Progress | None, span: tuple[float, float]) -> CallbackReporter:
    """run_sfm reports 0-100 through a ProgressReporter: mapped into the stage's span, and the
    solve stops there on cancel (CallbackReporter lets the callback's Cancelled through)."""
    low, high = span

    def forward(fraction: float, message: str) -> None:
        _stop_if_cancelled()
        if callback is not None:
            callback(low + (high - low) * fraction, message)

    return CallbackReporter(forward)


def _stop_if_cancelled() -> None:
    if cancel_requested():
        raise Cancelled(CANCEL_MESSAGE)


def _check_inputs(
    frames: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None
) -> tuple[int, int]:
    if len(frames) == 0:
        raise InvalidInput("the clip has no frames to solve the camera from")
    height, width = frames[0].shape[:2]
    for i, frame in enumerate(frames):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise InvalidInput(f"frame {i} is not a BGR uint8 HxWx3 image ({frame.shape})")
        if frame.shape[:2] != (height, width):
            raise InvalidInput(
                f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, frame 0 {width}x{height}: "
                "a clip's frames share one size"
            )
    if masks is not None:
        if len(masks) != len(frames):
            raise InvalidInput(f"{len(masks)} masks for {len(frames)} frames")
        for i, mask in enumerate(masks):
            if mask.shape != (height, width):
                raise InvalidInput(f"mask {i} is {mask.shape}, its frame {(height, width)}")
    return width, height


def _colmap_mask(mask: np.ndarray, dilate_px: int) -> np.ndarray:
    """COLMAP's feature mask: 0 on the (dilated) subject, 255 where features may be."""
    subject: np.ndarray = np.asarray(mask, bool).astype(np.uint8)
    if dilate_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1,) * 2)
        subject = np.asarray(cv2.dilate(subject, kernel))
    return np.where(subject > 0, 0, 255).astype(np.uint8)


def _write_inputs(
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    image_dir: Path,
    mask_dir: Path | None,
    dilate_px: int,
    progress: Progress | None,
) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    if mask_dir is not None:
        mask_dir.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        if i % _REPORT_EVERY == 0:
            _stop_if_cancelled()
            if progress is not None:
                low, high = _WRITE_SPAN
                progress(low + (high - low) * i / len(frames), f"writing frame {i}/{len(frames)}")
        name = FRAME_PATTERN.format(i)
        # PNG: lossless, so SIFT sees the frames as decoded (JPEG would add block edges).
        if not cv2.imwrite(str(image_dir / name), frame):
            raise OSError(f"could not write {image_dir / name}")
        # COLMAP looks for <mask_path>/<image name>.png.
        if (
            mask_dir is not None
            and masks is not None
            and not cv2.imwrite(str(mask_dir / f"{name}.png"), _colmap_mask(masks[i], dilate_px))
        ):
            raise OSError(f"could not write the mask of {name}")


def _matched_keypoints(pycolmap: Any, database: Path) -> dict[int, int]:
    """image_id -> how many of its keypoints are in at least one verified inlier match."""
    matched: dict[int, set[int]] = {}
    with pycolmap.Database.open(str(database)) as db:
        pair_ids, geometries = db.read_two_view_geometries()
    for pair_id, geometry in zip(pair_ids, geometries, strict=True):
        inliers = np.asarray(geometry.inlier_matches).reshape(-1, 2)
        if len(inliers) == 0:
            continue
        id1, id2 = pycolmap.pair_id_to_image_pair(pair_id)
        matched.setdefault(int(id1), set()).update(inliers[:, 0].tolist())
        matched.setdefault(int(id2), set()).update(inliers[:, 1].tolist())
    return {image_id: len(keys) for image_id, keys in matched.items()}


def _frame_index(name: str) -> int:
    found = _FRAME_NAME.search(name)
    if found is None:  # only our own files are in the image folder
        raise ValueError(f"unexpected image name {name!r} in the solve")
    return int(found.group(1))


def _quadrants(xy: np.ndarray, width: int, height: int) -> list[bool]:
    right = xy[:, 0] >= width / 2
    bottom = xy[:, 1] >= height / 2
    counts = [
        int(np.sum(~right & ~bottom)),
        int(np.sum(right & ~bottom)),
        int(np.sum(~right & bottom)),
        int(np.sum(right & bottom)),
    ]
    return [c >= QUADRANT_MIN_POINTS for c in counts]


def _read_solve(sfm: SfmResult, total: int, width: int, height: int, database: Path) -> CameraSolve:
    """Per-frame poses and observation statistics from the model run_sfm kept."""
    import pycolmap

    if sfm.model_dir is None:
        raise ValueError("run_sfm returned no model folder")
    model = pycolmap.Reconstruction(str(sfm.model_dir))
    point_ids = list(model.points3D.keys())
    row_of = {pid: row for row, pid in enumerate(point_ids)}
    points = np.array([model.points3D[pid].xyz for pid in point_ids], np.float64).reshape(-1, 3)
    point_errors = np.array([model.points3D[pid].error for pid in point_ids], np.float64)
    matched = _matched_keypoints(pycolmap, database)
    by_name = {im.name: im for im in sfm.images}

    poses = [FramePose(i, False, None, None, None, 0, [False] * 4) for i in range(total)]
    observed: dict[int, np.ndarray] = {}
    for image_id in model.reg_image_ids():
        image = model.image(image_id)
        frame = _frame_index(str(image.name))
        registered = by_name[str(image.name)]
        observations = [p for p in image.points2D if p.has_point3D()]
        rows = np.array([row_of[int(p.point3D_id)] for p in observations], np.int64)
        xy = np.array([p.xy for p in observations], np.float64).reshape(-1, 2)
        error = None
        if len(rows):
            cam = points[rows] @ registered.rotation.T + registered.translation
            projected = model.camera(image.camera_id).img_from_cam(cam, check_cheirality=False)
            error = float(np.linalg.norm(np.asarray(projected) - xy, axis=1).mean())
        poses[frame] = FramePose(
            frame=frame,
            registered=True,
            world_to_camera=registered.world_to_camera,
            camera_to_world=registered.camera_to_world,
            reprojection_error=error,
            num_points=len(rows),
            quadrants=_quadrants(xy, width, height),
            num_keypoints=int(image.num_points2D()),
            num_matched_keypoints=matched.get(int(image_id), 0),
        )
        observed[frame] = rows
    camera = sfm.images[0].intrinsics  # one camera for the clip
    intrinsics = {
        "model": camera.model,
        "fx": camera.fx,
        "fy": camera.fy,
        "cx": camera.cx,
        "cy": camera.cy,
        "params": list(camera.params),
        "distortion": camera.distortion(),
        "width": camera.width,
        "height": camera.height,
    }
    return CameraSolve(
        width=width,
        height=height,
        intrinsics=intrinsics,
        poses=poses,
        points=points,
        point_errors=point_errors,
        sfm=sfm,
        observed_points=observed,
    )


def solve_camera(
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    work_dir: Path,
    *,
    quality: str = "medium",
    max_features: int | None = None,
    matching: Matching = "sequential",
    mapper: Mapper = "incremental",
    mask_dilate_px: int = 4,
    camera_model: str = "SIMPLE_RADIAL",
    progress: Progress | None = None,
    min_registered_fraction: float = 0.5,
    max_image_side: int | None = None,
    num_threads: int | None = None,
    seed: int = 0,
) -> CameraSolve:
    """Solve one camera (shared intrinsics) and a pose per frame with the subject masked out.

    ``frames``: BGR uint8 images of one size; ``masks``: bool HxW per frame, True on the
    subject (None: no mask, every pixel may give features). Writes ``work_dir/images/
    frame_%06d.png`` (lossless), ``work_dir/masks/frame_%06d.png.png`` (subject 0, dilated
    by ``mask_dilate_px``, background 255) and COLMAP's database and model. ``quality``
    picks the SIFT feature cap from `QUALITY_FEATURES` unless ``max_features`` is given.
    Every input frame gets a `FramePose`; frames COLMAP did not register are flagged
    (``registered`` False, no pose). Raises `core.errors.SfmFailed` (with its hint) when
    COLMAP registers fewer than ``min_registered_fraction`` of the frames or none at all,
    and `core.errors.Cancelled` on a cancel between frames, extraction chunks and mapped
    images. ``max_image_side``: SIFT runs on frames downscaled to this longest side (None:
    the frames' own size; poses and intrinsics are always in the frames' pixels).
    ``progress(fraction, message)`` is this stage's 0..1.
    """
    if quality not in QUALITY_FEATURES:
        raise InvalidInput(f"quality must be one of {sorted(QUALITY_FEATURES)}, got {quality!r}")
    if mask_dilate_px < 0:
        raise InvalidInput(f"mask_dilate_px must be >= 0, got {mask_dilate_px}")
    width, height = _check_inputs(frames, masks)
    started = time.perf_counter()
    work_dir = Path(work_dir)
    image_dir = work_dir / "images"
    mask_dir = work_dir / "masks" if masks is not None else None
    _stop_if_cancelled()
    _write_inputs(frames, masks, image_dir, mask_dir, mask_dilate_px, progress)
    written = time.perf_counter()
    _stop_if_cancelled()
    sfm = run_sfm(
        image_dir,
        work_dir / "colmap",
        matching=matching,
        progress=_sfm_progress(progress, _SFM_SPAN),
        max_image_side=max_image_side or max(width, height),
        max_features=max_features or QUALITY_FEATURES[quality],
        mapper=mapper,
        min_registered_fraction=min_registered_fraction,
        camera_model=camera_model,
        single_camera=True,
        num_threads=num_threads,
        seed=seed,
        stage="camera_solve",
        mask_dir=mask_dir,
    )
    _stop_if_cancelled()
    solved = time.perf_counter()
    solve = _read_solve(sfm, len(frames), width, height, work_dir / "colmap" / "database.db")
    done = time.perf_counter()
    solve.timings_ms = {
        "write": round((written - started) * 1000, 1),
        **{k: v for k, v in sfm.timings_ms.items() if k != "total"},
        "sfm": sfm.timings_ms.get("total", round((solved - written) * 1000, 1)),
        "read": round((done - solved) * 1000, 1),
        "total": round((done - started) * 1000, 1),
    }
    if progress is not None:
        progress(1.0, f"camera solved: {sfm.num_registered}/{len(frames)} frames registered")
    return solve


def _jitter(solve: CameraSolve) -> float | None:
    """High-frequency energy of the camera path, scale-free: the RMS of the centres' second
    difference (c[i+1] - 2 c[i] + c[i-1], over runs of consecutive registered frames only)
    divided by the mean step |c[i+1] - c[i]|. A smooth path scores near its curvature
    (~0.1 for a 40-60 degree orbit sampled every 2-3 degrees); per-frame noise of a tenth
    of a step adds ~0.4. None with fewer than three consecutive registered frames."""
    second: list[np.ndarray] = []
    steps: list[float] = []
    centres = [p.centre for p in solve.poses]
    for i in range(1, len(centres)):
        a, b = centres[i - 1], centres[i]
        if a is not None and b is not None:
            steps.append(float(np.linalg.norm(b - a)))
        if i + 1 < len(centres):
            c = centres[i + 1]
            if a is not None and b is not None and c is not None:
                second.append(c - 2 * b + a)
    if not second or not steps or np.mean(steps) <= 0:
        return None
    rms = float(np.sqrt(np.mean(np.sum(np.square(second), axis=1))))
    return rms / float(np.mean(steps))


def pose_quality(solve: CameraSolve | None, total_frames: int) -> dict[str, Any]:
    """Orbit's pose metrics (its old backend's names), over the clip's ``total_frames``:

    * ``registered`` / ``total``: frames with a pose / frames in the clip;
    * ``inlier_ratio``: of the keypoints of registered frames that are in a geometrically
      verified match, the share that became observations of a 3D point (the rest were
      matched but not kept: outliers to the final model, or never triangulated);
    * ``median_reprojection_error``: median over registered frames of their mean error (px);
    * ``quadrant_coverage``: per image quadrant (TL, TR, BL, BR), the share of all frames
      with >= QUADRANT_MIN_POINTS observations there;
    * ``good_coverage_frame_percent``: the share (0..1, despite the name: Orbit's backend gave
      and gated a share) of all frames with >= 3 quadrants covered;
    * ``jitter_score``: see `_jitter` (None when undefined);
    * ``score`` (0..1, ours): registered share x a reprojection term (1 at <= 1 px, 0 at
      >= 4 px) x (0.5 + 0.5 x the well-covered share) x 1 / (1 + jitter).

    ``solve`` None (the solve failed): every frame unregistered and score 0.
    """
    total = max(total_frames, 0)
    if solve is None or total == 0:
        return {
            "score": 0.0,
            "inlier_ratio": 0.0,
            "median_reprojection_error": None,
            "quadrant_coverage": [0.0] * 4,
            "good_coverage_frame_percent": 0.0,
            "jitter_score": None,
            "registered": 0,
            "total": total,
        }
    registered = [p for p in solve.poses if p.registered]
    matched = sum(p.num_matched_keypoints for p in registered)
    observed = sum(p.num_points for p in registered)
    inlier_ratio = observed / matched if matched else 0.0
    reproj = solve.median_reprojection_error()
    covered = np.array([p.quadrants for p in solve.poses], bool).reshape(-1, 4)
    quadrant_share = covered.sum(axis=0) / total
    good = float(np.sum(covered.sum(axis=1) >= GOOD_COVERAGE_QUADRANTS)) / total
    jitter = _jitter(solve)
    reproj_term = (
        0.0
        if not np.isfinite(reproj)
        else float(np.clip((REPROJ_BAD_PX - reproj) / (REPROJ_BAD_PX - REPROJ_GOOD_PX), 0, 1))
    )
    smooth_term = 1.0 / (1.0 + jitter) if jitter is not None else 0.5
    score = len(registered) / total * reproj_term * (0.5 + 0.5 * good) * smooth_term
    return {
        "score": round(float(score), 4),
        "inlier_ratio": round(float(min(1.0, inlier_ratio)), 4),
        "median_reprojection_error": None if not np.isfinite(reproj) else round(reproj, 4),
        "quadrant_coverage": [round(float(s), 4) for s in quadrant_share],
        "good_coverage_frame_percent": round(float(good), 4),
        "jitter_score": None if jitter is None else round(jitter, 4),
        "registered": len(registered),
        "total": total,
    }


def scene_median_depth(solve: CameraSolve) -> float:
    """Median z of the sparse points in the cameras that observe them, over every
    observation, in the solve's (COLMAP's, arbitrary) units: the same units as the camera
    translations, for Orbit's bound (translation <= min(0.10 m, 2 % of this) once scaled)."""
    depths: list[np.ndarray] = []
    for pose in solve.poses:
        rows = solve.observed_points.get(pose.frame)
        if pose.world_to_camera is None or rows is None or len(rows) == 0:
            continue
        rot, trans = pose.world_to_camera[:3, :3], pose.world_to_camera[:3, 3]
        depths.append((solve.points[rows] @ rot.T + trans)[:, 2])
    if not depths:
        return float("nan")
    return float(np.median(np.concatenate(depths)))
