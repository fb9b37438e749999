"""Point tracks through a clip: the tracking stage of the Orbit job and the VFX pipeline.

The tracker here is pyramidal Lucas-Kanade (``cv2.calcOpticalFlowPyrLK``), frame to frame,
with a forward-backward check: each point is tracked from frame ``f - 1`` to ``f`` and back
again, and the distance between where it started and where it came back to (the FB error)
says whether the match can be trusted (Kalal et al., "Forward-Backward Error", 2010).

Conventions:

* positions are pixels with the top-left pixel's centre at (0.5, 0.5), as in the SfM stage
  (``core/splat/sfm.py``) and the camera intrinsics; OpenCV's own (centre at (0, 0)) is
  converted at the edges of this module;
* **visible**: the point passed LK (status 1 both ways, min eigenvalue of its window's
  gradient matrix above ``min_eig_threshold``), its FB error is at most ``fb_threshold_px``,
  its window still looks like the same point's window at its anchor frame (normalised
  cross-correlation >= ``min_anchor_ncc``; the anchor is refreshed every ``anchor_every``
  frames), it is inside the image, and (with masks) a background point is not on the subject
  mask and a subject point has not left it. **Once lost a track stays lost**: a point that
  comes back into view is a new track, seeded when coverage is refilled (every
  ``reseed_every`` frames);
* **confidence** per visible frame is ``exp(-fb_err / fb_sigma_px - lk_err /
  photometric_sigma)``: ``fb_err`` in pixels, ``lk_err`` LK's mean absolute grey-level
  difference between the point's window in the two frames. It is 1 for a perfect match and
  falls with either error: with the defaults a step with FB error 0.05 px (a good step is
  under ~0.03) and LK error 4 grey levels scores 0.51; one at the FB threshold scores under
  0.05. The seed frame has confidence 1 (the point is where it was put); 0 where not
  visible. The track gate (``filter_tracks``) reads a track's median.

Why these defaults, measured on the rendered Orbit clip (subject crossing, 320x240, 48
frames; share of background samples within 2 px of the truth): a 21 px window with a 1 px FB
threshold and no appearance check 66 %; 15 px and 0.3 px 83 %; 11 px 89 %; with the
appearance check (NCC 0.9) 93 %. What is left is mostly corners on silhouettes (a box's edge
against the ground), which slide consistently both ways. Subject points: 84 % -> 99.7 %.
The price is tracks lost sooner (and reseeded): ~70 % of truly visible samples are tracked.

A learned tracker replaces LK through ``PointTracker``: ``track_clip(..., tracker=X)`` seeds
the same query points (frame 0 and each refill) and calls ``X.track(frames, queries,
should_stop)`` with the whole clip. TAPIR's outputs map as:

* ``tracks`` [n, F, 2] (x, y, in its input's pixel grid; scale back to the frame, and add
  0.5 if its grid puts pixel centres on integers) -> ``positions``;
* ``occlusions`` (logits) and ``expected_dist`` -> ``visible = (1 - sigmoid(occ)) * (1 -
  sigmoid(expected_dist)) > 0.5`` (TAPIR's own ``postprocess_occlusions``);
* ``confidence = (1 - sigmoid(occ)) * (1 - sigmoid(expected_dist))`` where visible, else 0.

CoTracker's (tracks, visibility) map the same way with its visibility probability as the
confidence. Whatever the tracker, track_clip applies the subject mask the same way (above).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from core.control import cancel_requested
from core.errors import Cancelled, InvalidInput

__all__ = [
    "LucasKanadeTracker",
    "PointTracker",
    "Tracks",
    "filter_tracks",
    "seed_points",
    "track_clip",
    "track_quality",
    "tracks_document",
]

TRACKS_FORMAT = "orbit-tracks/1"
CANCELLED_MESSAGE = "the job was cancelled (or ran past its execution timeout)"

ProgressCallback = Callable[[float, str], None]


@dataclass
class Tracks:
    positions: np.ndarray
    """[n, frames, 2] float32 pixel (x, y), top-left pixel's centre at (0.5, 0.5); undefined
    where not visible."""
    visible: np.ndarray
    """[n, frames] bool."""
    confidence: np.ndarray
    """[n, frames] float32 in 0..1, 0 where not visible."""
    query_frame: np.ndarray
    """[n] int: the frame each track was seeded on (not visible before it)."""
    on_subject: np.ndarray
    """[n] bool: seeded inside the subject mask."""

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def frame_count(self) -> int:
        return int(self.positions.shape[1])

    def lifespans(self) -> np.ndarray:
        """Visible frames per track, [n] int."""
        return self.visible.sum(axis=1).astype(np.int64)

    def median_confidence(self) -> np.ndarray:
        """Each track's median confidence over its visible frames ([n]; 0 for none)."""
        masked = np.where(self.visible, self.confidence, np.nan)
        out = np.zeros(len(self), np.float32)
        alive = self.visible.any(axis=1)
        if alive.any():
            out[alive] = np.nanmedian(masked[alive], axis=1)
        return out


class PointTracker(Protocol):
    """What a learned tracker implements to replace LK: TAPIR/CoTracker take the whole clip and
    query points."""

    name: str

    def track(
        self,
        frames: Sequence[np.ndarray],
        queries: np.ndarray,
        should_stop: Callable[[], bool],
        progress: Callable[[float], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """queries [n, 3] (frame, x, y) -> positions [n, F, 2], visible [n, F], confidence [n, F].

        Frames are BGR uint8; x, y in this module's convention (pixel centres at +0.5). The
        tracker calls ``should_stop()`` between frames (or chunks) and, once it is True,
        returns at once (what it has; track_clip then raises Cancelled) or raises Cancelled.
        ``progress``, when given, takes the fraction of this call done (optional to honour)."""
        ...


@dataclass
class LucasKanadeTracker:
    """Pyramidal Lucas-Kanade, frame to frame, with the forward-backward check and an
    appearance check against a recent anchor patch (module doc)."""

    window_size: int = 11
    """Side of the square window LK matches, pixels (at every pyramid level). Small: a window
    that straddles a depth edge follows the mixture of both surfaces, and a small one
    straddles fewer (21 loses ~10 points of the 2 px share on the Orbit test clip)."""
    pyramid_levels: int = 3
    """Levels above the full image (OpenCV's ``maxLevel``): handles motion up to ~2^L x half
    the window per frame."""
    fb_threshold_px: float = 0.3
    """A point whose forward-backward error exceeds this is lost. Correct steps come back
    within ~0.03 px (90th percentile on rendered clips); sliding ones at ~0.13 px (median)."""
    min_eig_threshold: float = 1e-3
    """LK refuses a point whose window's min gradient eigenvalue (normalised by the window's
    pixel count, OpenCV's ``minEigThreshold``) is below this: a textureless window."""
    max_iterations: int = 30
    epsilon: float = 0.01
    min_anchor_ncc: float = 0.9
    """A point is lost when its window's normalised cross-correlation with the same point's
    window at its anchor frame falls below this: the content changed (a surface sliding
    behind a silhouette, a point dragged off its texture), which FB cannot see."""
    anchor_every: int = 4
    """The anchor patch is refreshed every this many frames, so slow, true deformation
    (foreshortening as the camera orbits) does not fail the appearance check."""
    fb_sigma_px: float = 0.1
    """Confidence scale for the FB error (module doc)."""
    photometric_sigma: float = 24.0
    """Confidence scale for LK's mean absolute grey-level error (module doc)."""
    border_px: float = 1.0
    """A point closer than this to the image's edge has left it."""
    name: str = "lucas-kanade"

    def _lk(self, a: np.ndarray, b: np.ndarray, points: np.ndarray) -> tuple[Any, Any, Any]:
        criteria = (
            cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS,
            self.max_iterations,
            self.epsilon,
        )
        start = points.reshape(-1, 1, 2).astype(np.float32)
        # nextPts is only read with OPTFLOW_USE_INITIAL_FLOW (not set); passed for the stubs.
        return cv2.calcOpticalFlowPyrLK(
            a,
            b,
            start,
            start.copy(),
            winSize=(self.window_size, self.window_size),
            maxLevel=self.pyramid_levels,
            criteria=criteria,
            minEigThreshold=self.min_eig_threshold,
        )

    def _inside(self, points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        height, width = shape[:2]
        return (
            (points[:, 0] >= self.border_px)
            & (points[:, 0] <= width - self.border_px)
            & (points[:, 1] >= self.border_px)
            & (points[:, 1] <= height - self.border_px)
        )

    def patches(self, grey: np.ndarray, points: np.ndarray) -> np.ndarray:
        """[m, window, window] float32 windows centred on ``points`` (our convention),
        sampled bilinearly, edges replicated."""
        half = self.window_size // 2
        offsets = np.arange(-half, half + 1, dtype=np.float32)
        centre = points.astype(np.float32) - 0.5
        map_x = (centre[:, 0, None, None] + offsets[None, None, :]).repeat(len(offsets), 1)
        map_y = (centre[:, 1, None, None] + offsets[None, :, None]).repeat(len(offsets), 2)
        side = len(offsets)
        sampled = cv2.remap(
            grey.astype(np.float32),
            map_x.reshape(-1, side),
            map_y.reshape(-1, side),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return sampled.reshape(-1, side, side)

    @staticmethod
    def ncc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Normalised cross-correlation of matching windows, [m] in -1..1 (0 for a flat one)."""
        a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(axis=1, keepdims=True)
        b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(axis=1, keepdims=True)
        norm = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        return np.where(norm > 1e-6, (a * b).sum(axis=1) / np.maximum(norm, 1e-6), 0.0)

    def step(
        self, prev_grey: np.ndarray, grey: np.ndarray, points: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Track ``points`` [m, 2] (our convention) one frame with the FB check: (new points
        [m, 2], ok [m], confidence [m])."""
        if len(points) == 0:
            return np.zeros((0, 2), np.float32), np.zeros(0, bool), np.zeros(0, np.float32)
        start = points.astype(np.float32) - 0.5  # OpenCV puts pixel centres on integers
        forward, status_f, err = self._lk(prev_grey, grey, start)
        backward, status_b, _ = self._lk(grey, prev_grey, forward)
        moved = forward.reshape(-1, 2) + 0.5
        fb_err = np.nan_to_num(np.linalg.norm(backward.reshape(-1, 2) - start, axis=1), nan=np.inf)
        lk_err = np.nan_to_num(err.ravel().astype(np.float64), nan=np.inf)
        ok = (
            (status_f.ravel() == 1)
            & (status_b.ravel() == 1)
            & (fb_err <= self.fb_threshold_px)
            & np.isfinite(moved).all(axis=1)
            & self._inside(moved, grey.shape)
        )
        with np.errstate(over="ignore"):
            confidence = np.exp(-fb_err / self.fb_sigma_px - lk_err / self.photometric_sigma)
        confidence = np.where(ok, confidence, 0.0).astype(np.float32)
        return moved.astype(np.float32), ok, confidence

    def track(
        self,
        frames: Sequence[np.ndarray],
        queries: np.ndarray,
        should_stop: Callable[[], bool],
        progress: Callable[[float], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each query tracked forward from its frame until lost; not visible before it."""
        n, frame_count = len(queries), len(frames)
        positions = np.zeros((n, frame_count, 2), np.float32)
        visible = np.zeros((n, frame_count), bool)
        confidence = np.zeros((n, frame_count), np.float32)
        if n == 0:
            return positions, visible, confidence
        query_frames = queries[:, 0].astype(np.int64)
        first = int(query_frames.min())
        alive = np.zeros(n, bool)
        current = np.zeros((n, 2), np.float32)
        side = self.window_size // 2 * 2 + 1
        anchors = np.zeros((n, side, side), np.float32)
        anchor_frame = np.zeros(n, np.int64)
        prev_grey: np.ndarray | None = None
        for f in range(first, frame_count):
            if should_stop():
                break
            grey = _grey(frames[f])
            if prev_grey is not None and alive.any():
                ids = np.flatnonzero(alive)
                moved, ok, conf = self.step(prev_grey, grey, current[ids])
                windows = self.patches(grey, moved)
                ok &= self.ncc(windows, anchors[ids]) >= self.min_anchor_ncc
                refresh = ok & (f - anchor_frame[ids] >= self.anchor_every)
                anchors[ids[refresh]] = windows[refresh]
                anchor_frame[ids[refresh]] = f
                current[ids] = moved
                alive[ids] = ok
                positions[ids, f] = moved
                visible[ids, f] = ok
                confidence[ids, f] = np.where(ok, conf, 0.0)
            born = np.flatnonzero(query_frames == f)
            if len(born):
                xy = queries[born, 1:3].astype(np.float32)
                inside = self._inside(xy, grey.shape)
                current[born] = xy
                alive[born] = inside
                anchors[born] = self.patches(grey, xy)
                anchor_frame[born] = f
                positions[born, f] = xy
                visible[born, f] = inside
                confidence[born, f] = inside.astype(np.float32)
            prev_grey = grey
            if progress is not None and (f - first) % 4 == 3:
                progress((f - first + 1) / (frame_count - first))
        return positions, visible, confidence


def _grey(frame_bgr: np.ndarray) -> np.ndarray:
    if frame_bgr.ndim == 2:
        return frame_bgr
    return cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)


def _disk_kernel(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def seed_points(
    frame_bgr: np.ndarray,
    mask: np.ndarray | None,
    count: int,
    *,
    inside: bool,
    min_distance: float,
    exclude: np.ndarray | None = None,
    boundary_margin_px: int = 3,
    quality_level: float = 0.01,
    block_size: int = 7,
) -> np.ndarray:
    """Up to ``count`` good-features-to-track corners (Shi-Tomasi) inside the mask
    (``inside=True``) or outside it, at least ``min_distance`` px from each other and from
    every point of ``exclude`` [m, 2]; [k, 2] float32 (x, y), our pixel convention.

    Corners within ``boundary_margin_px`` of the mask's edge are refused on either side: a
    corner on the silhouette is where subject meets background, no point of either, and it
    slides as they move apart. ``mask=None``: the whole image."""
    if count <= 0:  # goodFeaturesToTrack's maxCorners=0 means "no limit"
        return np.zeros((0, 2), np.float32)
    grey = _grey(frame_bgr)
    height, width = grey.shape[:2]
    region: np.ndarray
    if mask is None:
        region = np.full((height, width), 255, np.uint8)
    else:
        if mask.shape != (height, width):
            raise InvalidInput(f"mask shape {mask.shape} does not match the frame's {grey.shape}")
        chosen = mask if inside else ~mask
        region = chosen.astype(np.uint8) * 255
        if boundary_margin_px > 0:
            region = cv2.erode(region, _disk_kernel(boundary_margin_px))
    if exclude is not None and len(exclude):
        radius = max(1, math.ceil(min_distance))
        for x, y in np.asarray(exclude, np.float64).reshape(-1, 2):
            if np.isfinite(x) and np.isfinite(y):
                cv2.circle(region, (int(x), int(y)), radius, 0, thickness=-1)
    if not region.any():
        return np.zeros((0, 2), np.float32)
    corners = cv2.goodFeaturesToTrack(
        grey,
        maxCorners=int(count),
        qualityLevel=quality_level,
        minDistance=float(min_distance),
        mask=region,
        blockSize=block_size,
    )
    if corners is None:
        return np.zeros((0, 2), np.float32)
    return (corners.reshape(-1, 2) + 0.5).astype(np.float32)


def _mask_violations(
    positions: np.ndarray,
    visible: np.ndarray,
    on_subject: np.ndarray,
    masks: Sequence[np.ndarray],
    margin_px: int,
) -> np.ndarray:
    """[n, F] True where a visible point is on the wrong side of the subject mask: a background
    point on the subject (dilated by the margin: hidden, or about to be and dragged by its
    edge) or a subject point off it (shrunk by the margin: it slid onto the background)."""
    n, frame_count = visible.shape
    wrong = np.zeros((n, frame_count), bool)
    kernel = _disk_kernel(margin_px) if margin_px > 0 else None
    for f in range(frame_count):
        ids = np.flatnonzero(visible[:, f])
        if len(ids) == 0:
            continue
        mask = masks[f].astype(np.uint8)
        grown = cv2.dilate(mask, kernel) if kernel is not None else mask
        shrunk = cv2.erode(mask, kernel) if kernel is not None else mask
        height, width = mask.shape
        cols = np.clip(positions[ids, f, 0].astype(np.int64), 0, width - 1)
        rows = np.clip(positions[ids, f, 1].astype(np.int64), 0, height - 1)
        subject = on_subject[ids]
        wrong[ids, f] = np.where(subject, shrunk[rows, cols] == 0, grown[rows, cols] != 0)
    return wrong


def _lose_from_first(bad: np.ndarray) -> np.ndarray:
    """[n, F] True from each row's first True on: once lost a track stays lost."""
    return np.cumsum(bad, axis=1) > 0


def track_clip(
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    *,
    subject_points: int = 200,
    background_points: int = 300,
    reseed_every: int = 8,
    tracker: PointTracker | None = None,
    progress: ProgressCallback | None = None,
    min_distance: float = 6.0,
    mask_margin_px: int = 2,
    refill_below: float = 0.9,
) -> Tracks:
    """Seed on frame 0 (``subject_points`` inside the subject mask, ``background_points``
    outside it; without masks all of them anywhere, none on the subject) and track forward.
    Every ``reseed_every`` frames, where a group's visible tracks fell below ``refill_below`` of
    its target, new tracks are seeded in that frame away from the live ones (their
    ``query_frame`` is that frame). Cancellable between frames."""
    frame_count = len(frames)
    if frame_count == 0:
        raise InvalidInput("track_clip needs at least one frame")
    if masks is not None and len(masks) != frame_count:
        raise InvalidInput(f"{len(masks)} masks for {frame_count} frames")
    if reseed_every < 1:
        raise InvalidInput("reseed_every must be >= 1")
    chosen: PointTracker = tracker if tracker is not None else LucasKanadeTracker()
    checkpoints = list(range(0, frame_count, reseed_every))
    # A call's work is the frames it runs over (what a whole-clip tracker pays per call).
    work = np.array([frame_count - s for s in checkpoints], np.float64)
    work_before = np.concatenate([[0.0], np.cumsum(work)])
    if masks is None:
        groups = [(False, subject_points + background_points)]
    else:
        groups = [(True, subject_points), (False, background_points)]

    positions = np.zeros((0, frame_count, 2), np.float32)
    visible = np.zeros((0, frame_count), bool)
    confidence = np.zeros((0, frame_count), np.float32)
    query_frame = np.zeros(0, np.int64)
    on_subject = np.zeros(0, bool)

    for number, start in enumerate(checkpoints):
        if cancel_requested():
            raise Cancelled(CANCELLED_MESSAGE)
        mask = None if masks is None else np.asarray(masks[start], bool)
        new_points: list[np.ndarray] = []
        new_subject: list[np.ndarray] = []
        live = visible[:, start]
        for subject, target in groups:
            have = int((live & (on_subject == subject)).sum())
            if start > 0 and have >= refill_below * target:
                continue
            seeds = seed_points(
                frames[start],
                mask,
                target - have,
                inside=subject,
                min_distance=min_distance,
                exclude=positions[live, start],
            )
            new_points.append(seeds)
            new_subject.append(np.full(len(seeds), subject))
        seeds = np.concatenate(new_points) if new_points else np.zeros((0, 2), np.float32)
        if len(seeds) == 0:
            continue
        queries = np.concatenate([np.full((len(seeds), 1), start, np.float32), seeds], axis=1)

        def call_progress(fraction: float, number: int = number, start: int = start) -> None:
            if progress is not None:
                done = work_before[number] + fraction * work[number]
                progress(float(done / work_before[-1]), f"tracking points from frame {start}")

        pos, vis, conf = chosen.track(frames, queries, cancel_requested, call_progress)
        if cancel_requested():
            raise Cancelled(CANCELLED_MESSAGE)
        pos = np.asarray(pos, np.float32).reshape(len(seeds), frame_count, 2)
        vis = np.asarray(vis, bool).reshape(len(seeds), frame_count).copy()
        conf = np.asarray(conf, np.float32).reshape(len(seeds), frame_count)
        subject_flags = np.concatenate(new_subject)
        vis[:, :start] = False  # a track begins at its query frame
        if masks is not None:
            wrong = _mask_violations(pos, vis, subject_flags, masks, mask_margin_px)
            vis &= ~_lose_from_first(wrong)
        # Once lost, stays lost: whatever a tracker says after a gap is a new track's job.
        lost = np.zeros_like(vis)
        lost[:, start:] = ~vis[:, start:]
        vis &= ~_lose_from_first(lost)
        conf = np.where(vis, np.clip(conf, 0.0, 1.0), 0.0).astype(np.float32)

        positions = np.concatenate([positions, pos])
        visible = np.concatenate([visible, vis])
        confidence = np.concatenate([confidence, conf])
        query_frame = np.concatenate([query_frame, np.full(len(seeds), start, np.int64)])
        on_subject = np.concatenate([on_subject, subject_flags])
    if progress is not None:
        progress(1.0, f"{len(positions)} tracks over {frame_count} frames")
    return Tracks(positions, visible, confidence, query_frame, on_subject)


def local_motion_residuals(
    tracks: Tracks, *, window: int = 8, neighbours: int = 12, agreeing: int = 2
) -> np.ndarray:
    """[n] each track's worst disagreement with the local motion, pixels (0 where it was never
    visible across a whole window with enough neighbours).

    For every span of ``window`` frames a track is visible across, its displacement is compared
    with those of its ``neighbours`` nearest tracks (at the span's start, same group, visible
    across the same span); the residual is the ``agreeing``-th smallest difference: a true
    point moves like a few of its nearest neighbours, even beside a depth edge where the
    others, on another surface, move differently (parallax) and their median would condemn
    it, while a drifting track agrees with none of them. On the Orbit test clip's true tracks
    (lifespan >= 15) a 3 px gate keeps ~92 % (the median of the 8 nearest: ~70 %), and it
    catches ~93 % of copies drifting 1 px a frame off them (tests/test_tracks.py)."""
    n, frame_count = tracks.visible.shape
    worst = np.zeros(n)
    span = max(1, min(window, frame_count - 1))
    if frame_count < 2:
        return worst
    for f in range(frame_count - span):
        across = tracks.visible[:, f] & tracks.visible[:, f + span]
        for subject in (True, False):
            ids = np.flatnonzero(across & (tracks.on_subject == subject))
            if len(ids) <= agreeing:
                continue
            here = tracks.positions[ids, f].astype(np.float64)
            moved = tracks.positions[ids, f + span] - here
            dist = np.linalg.norm(here[:, None] - here[None], axis=2)
            np.fill_diagonal(dist, np.inf)
            k = min(neighbours, len(ids) - 1)
            nearest = np.argpartition(dist, k - 1, axis=1)[:, :k]
            differences = np.linalg.norm(moved[nearest] - moved[:, None], axis=2)
            residual = np.partition(differences, agreeing - 1, axis=1)[:, agreeing - 1]
            worst[ids] = np.maximum(worst[ids], residual)
    return worst


def filter_tracks(
    tracks: Tracks,
    *,
    min_confidence: float = 0.6,
    min_lifespan: int = 15,
    max_residual_px: float = 3.0,
    neighbours: int = 12,
    residual_window: int = 8,
) -> np.ndarray:
    """[n] bool keep mask, the Orbit PRD's track gate: a track is dropped when its median
    confidence (over its visible frames) is below ``min_confidence``, it is visible fewer than
    ``min_lifespan`` frames, or it moves against the local motion by more than
    ``max_residual_px`` over any ``residual_window`` frames (``local_motion_residuals``):
    measured over a window, a slow drift that no single frame shows adds up."""
    if len(tracks) == 0:
        return np.zeros(0, bool)
    keep = (tracks.lifespans() >= min_lifespan) & (tracks.median_confidence() >= min_confidence)
    residual = local_motion_residuals(tracks, window=residual_window, neighbours=neighbours)
    return keep & (residual <= max_residual_px)


def track_quality(tracks: Tracks, keep: np.ndarray) -> dict[str, Any]:
    """Counts and medians of the kept tracks, and ``score`` in 0..1: the share of tracks kept x
    the kept tracks' median confidence x their median lifespan over the clip's length."""
    keep = np.asarray(keep, bool)
    lifespans = tracks.lifespans()[keep]
    confidences = tracks.median_confidence()[keep]
    kept = int(keep.sum())
    median_lifespan = float(np.median(lifespans)) if kept else 0.0
    median_confidence = float(np.median(confidences)) if kept else 0.0
    share = kept / len(tracks) if len(tracks) else 0.0
    span = median_lifespan / tracks.frame_count if tracks.frame_count else 0.0
    return {
        "num_tracks_kept": kept,
        "num_tracks_discarded": int(len(tracks) - kept),
        "median_lifespan": median_lifespan,
        "median_confidence": median_confidence,
        "subject_tracks_kept": int((keep & tracks.on_subject).sum()),
        "background_tracks_kept": int((keep & ~tracks.on_subject).sum()),
        "score": float(share * median_confidence * min(1.0, span)),
    }


def tracks_document(
    tracks: Tracks,
    keep: np.ndarray,
    fps: float,
    frame_indices: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The tracks.json Orbit reads (``orbit-tracks/1``): the kept tracks, each with a point
    per frame from its query frame to its last visible one (``visible`` false where a tracker
    that sees through gaps had none; LK's tracks have no gaps). ``frame_index`` is the source
    frame number (``frame_indices[f]``) when the clip was sampled, else ``f``. Pixels, the
    top-left pixel's centre at (0.5, 0.5)."""
    frame_count = tracks.frame_count
    if frame_indices is not None and len(frame_indices) != frame_count:
        raise InvalidInput(f"{len(frame_indices)} frame indices for {frame_count} frames")
    numbers = [int(i) for i in frame_indices] if frame_indices is not None else None
    documents = []
    for track_id in np.flatnonzero(np.asarray(keep, bool)):
        seen = np.flatnonzero(tracks.visible[track_id])
        if len(seen) == 0:
            continue
        points = []
        for f in range(int(tracks.query_frame[track_id]), int(seen[-1]) + 1):
            x, y = tracks.positions[track_id, f]
            points.append(
                {
                    "frame_index": numbers[f] if numbers is not None else f,
                    "x": round(float(x), 3),
                    "y": round(float(y), 3),
                    "visible": bool(tracks.visible[track_id, f]),
                    "confidence": round(float(tracks.confidence[track_id, f]), 4),
                }
            )
        documents.append(
            {
                "id": int(track_id),
                "on_subject": bool(tracks.on_subject[track_id]),
                "query_frame": numbers[int(tracks.query_frame[track_id])]
                if numbers is not None
                else int(tracks.query_frame[track_id]),
                "points": points,
            }
        )
    return {
        "format": TRACKS_FORMAT,
        "fps": float(fps),
        "frame_count": frame_count,
        "pixel_centre": 0.5,
        "tracks": documents,
    }
