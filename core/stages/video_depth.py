"""Temporally consistent video depth: Depth Anything per frame, aligned across the shot.

Depth Anything gives relative inverse depth (affine-invariant disparity): each frame's map is
right only up to its own unknown scale and shift, so a clip of per-frame maps flickers, and
normalising each frame to its own min/max (what the old backends did) flickers too, for real,
whenever the nearest or farthest thing in view changes. This stage gives the whole shot ONE
scale, as DepthCrafter and Video Depth Anything do:

1. ``estimate_disparity``: the model per frame (``core.tasks.depth``), at the frame's size.
2. ``align_disparity``: per frame a scale and shift, ``aligned = scale * raw + shift``, fitted so
   the frame agrees with frames already aligned at the same scene points:
   * points are matched by dense optical flow (OpenCV DIS at a working size of at most
     ``FLOW_MAX_SIDE``), kept only where the forward and backward flows agree
     (``FB_TOLERANCE_PX``) and outside the (dilated) subject masks in both frames: a moving
     subject's depth changes for real, the static background's does not (to first order:
     a camera moving towards or away from it changes it too, and a chain books that as a
     scale change, frame after frame; on the test orbit, which rises and falls by 0.25 m,
     17 % over 48 frames. No image-only fit sees the difference; the next two steps bound it);
   * each frame is fitted against the previous frame AND the most recent keyframes (a new
     keyframe every ``KEYFRAME_GAP`` frames, or sooner when the overlap with the newest one
     falls under ``KEYFRAME_OVERLAP``), each reference with the same total weight, so fit
     errors add up over keyframe hops rather than over every frame;
   * the fit is robust (a quantile start, then trimmed refits at ``TRIM_SIGMAS`` robust
     sigmas) and symmetric (reduced major axis: both sides of a match are noisy model output,
     and an ordinary least-squares slope would shrink by the noise every frame, compounding
     along the chain);
   * without anchors, the range hold (``range_window``, default ``RANGE_WINDOW`` frames): the
     chain keeps the frame-to-frame agreement, and its slow drift is taken out by following
     each frame's own robust range (``RANGE_PERCENTILES``) smoothed over the window (noisy
     frame to frame, but without the chain's trend). It assumes the shot's depth range has
     no trend over a window; a long dolly breaks that, and anchors are the fix;
   * ``anchors`` (pixel coordinates and known inverse depth, e.g. SfM points seen in the
     frame) join each anchored frame's fit with ``ANCHOR_SHARE`` of its weight, after one
     global fit has put the chain into the anchors' units: real geometry against drift (no
     range hold then), and the result is in their units (inverse SfM depth), not normalised;
   * without anchors, one normalisation for the whole shot: its min..max goes to 0..1. Never
     per frame.
3. ``consistent_depth``: both, the shot's one PNG range, and Orbit's quality numbers.

Frames are BGR uint8 (HxWx3), masks bool HxW (True on the moving subject); every output map is
float32 HxW at its frame's size. Larger is nearer throughout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from core.control import cancel_requested
from core.encode import depth_to_png16
from core.errors import Cancelled, InvalidInput
from core.models import LoadedModel
from core.tasks._flow import DisFlow, resize_to, working_size
from core.tasks.depth import check_fits_model, infer_raw, resize_depth

__all__ = [
    "ConsistentDepth",
    "DepthAlignment",
    "align_disparity",
    "consistent_depth",
    "depth_quality",
    "depth_to_png16",
    "estimate_disparity",
    "flicker",
    "normalise_per_frame",
]

Progress = Callable[[float, str], None]
Anchor = tuple[np.ndarray, np.ndarray]

FLOW_MAX_SIDE = 320
"""Flow and the fit run at this longest side: enough static pixels, ~70 ms a pair on a CPU."""
FB_TOLERANCE_PX = 1.0
"""Forward-backward flow disagreement (working pixels) beyond which a match is dropped."""
MASK_MARGIN_PX = 3
"""Subject masks grow by this (working pixels): flow and depth both smear across its edge."""
MAX_SAMPLES = 4000
"""Matches kept per frame pair (an even random subset): the fit needs no more."""
MIN_MATCHES = 64
"""Fewer static matches than this and a frame is fitted by its value distribution instead."""
KEYFRAME_GAP = 8
KEYFRAME_OVERLAP = 0.5
MAX_KEYFRAME_REFS = 2
"""Keyframes (besides the previous frame) each frame is fitted against."""
TRIM_SIGMAS = 3.0
FIT_ITERATIONS = 5
ANCHOR_SHARE = 0.5
"""An anchored frame's fit gives its anchors this share of the total weight."""
CONFIDENT_MATCHES = 500
RESIDUAL_TOLERANCE = 0.05
"""A frame's confidence reaches 0 when its median fit residual is this fraction of the range."""
FLICKER_WEIGHT = 5.0
"""temporal_consistency = max(0, 1 - 5 * flicker), as Orbit's old backend scored it."""
EDGE_BAND_PX = 3
RANGE_WINDOW = 24
"""Frames over which the chain's long-run level follows the frames' own ranges (about 2 s)."""
RANGE_PERCENTILES = (2.0, 98.0)


def _check_cancel() -> None:
    if cancel_requested():
        raise Cancelled("the job was cancelled (or ran past its execution timeout)")


def _report(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)), message)


def _scaled(progress: Progress | None, start: float, end: float) -> Progress | None:
    """A sub-stage's progress (0..1) mapped into [start, end] of this stage's."""
    if progress is None:
        return None
    report = progress

    def scaled(fraction: float, message: str) -> None:
        report(start + (end - start) * fraction, message)

    return scaled


# --------------------------------------------------------------------------------------------
# 1. The model per frame


def estimate_disparity(
    loaded_model: LoadedModel,
    frames: Sequence[np.ndarray],
    *,
    input_size: int | None = None,
    batch: int = 4,
    progress: Progress | None = None,
) -> list[np.ndarray]:
    """Depth Anything on every frame (BGR uint8): its relative inverse depth, float32 HxW at the
    frame's size, each frame with its own unknown scale and shift. Consecutive frames of one
    size share a forward pass, up to `batch`; cancellable between passes."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    depth_model = loaded_model.model
    results: list[np.ndarray] = []
    checked: set[tuple[int, int]] = set()
    start = 0
    while start < len(frames):
        _check_cancel()
        shape = frames[start].shape[:2]
        stop = start + 1
        while stop < len(frames) and stop - start < batch and frames[stop].shape[:2] == shape:
            stop += 1
        height, width = shape
        if shape not in checked:
            check_fits_model(depth_model, width, height, input_size, f"frame {start}")
            checked.add(shape)
        rgb = [cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in frames[start:stop]]
        raw = infer_raw(loaded_model, rgb, input_size)
        for k in range(stop - start):
            results.append(resize_depth(depth_model, raw[k], height, width).astype(np.float32))
        start = stop
        _report(progress, start / len(frames), f"depth: frame {start} of {len(frames)}")
    return results


# --------------------------------------------------------------------------------------------
# Matching static pixels between frames by optical flow


@dataclass
class _Matches:
    """Static pixels of frame `t` and where they are in frame `u`, at the working size."""

    t: int
    u: int
    source: np.ndarray
    """[n] flat indices into frame t's working grid."""
    target: np.ndarray
    """[n, 2] float32 (x, y) in frame u's working grid."""
    fraction: float
    """Matched share of frame t's static pixels (how much the two frames overlap)."""


class _Matcher:
    """Flow between any two frames of a clip at the working size, forward-backward checked,
    outside the subject; the matches are an even subset of at most MAX_SAMPLES pixels."""

    def __init__(self, frames: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None) -> None:
        if not frames:
            raise ValueError("no frames")
        height, width = frames[0].shape[:2]
        for index, frame in enumerate(frames):
            if frame.shape[:2] != (height, width):
                raise InvalidInput(
                    f"frame {index} is {frame.shape[1]}x{frame.shape[0]}; the clip's first "
                    f"is {width}x{height} (one shot, one size)"
                )
        if masks is not None and len(masks) != len(frames):
            raise InvalidInput(f"{len(masks)} masks for {len(frames)} frames")
        self.full_size = (width, height)
        self.size = working_size(width, height, FLOW_MAX_SIDE)
        self.frames = [resize_to(frame, self.size) for frame in frames]
        self.flow = DisFlow()
        self.moving: list[np.ndarray | None] = []
        kernel = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * MASK_MARGIN_PX + 1, 2 * MASK_MARGIN_PX + 1)
        )
        for index in range(len(frames)):
            mask = None if masks is None else masks[index]
            if mask is None or not mask.any():
                self.moving.append(None)
                continue
            if mask.shape != (height, width):
                raise InvalidInput(f"mask {index} is {mask.shape}, its frame {(height, width)}")
            small = cv2.resize(mask.astype(np.uint8), self.size, interpolation=cv2.INTER_NEAREST)
            self.moving.append(cv2.dilate(small, kernel) > 0)
        w, h = self.size
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        self.grid = np.stack([xs, ys], axis=-1)

    def match(self, t: int, u: int) -> _Matches:
        forward = self.flow(self.frames[t], self.frames[u])
        backward = self.flow(self.frames[u], self.frames[t])
        w, h = self.size
        target = self.grid + forward
        back = cv2.remap(
            backward, target[..., 0], target[..., 1], cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT, borderValue=(1e6, 1e6),
        )  # fmt: skip
        agree = np.linalg.norm(forward + back, axis=-1) <= FB_TOLERANCE_PX
        inside = (
            (target[..., 0] >= 0)
            & (target[..., 0] <= w - 1)
            & (target[..., 1] >= 0)
            & (target[..., 1] <= h - 1)
        )
        static = np.ones((h, w), bool)
        moving_t, moving_u = self.moving[t], self.moving[u]
        if moving_t is not None:
            static &= ~moving_t
        valid = agree & inside & static
        if moving_u is not None:
            cols = np.clip(np.rint(target[..., 0]).astype(np.int64), 0, w - 1)
            rows = np.clip(np.rint(target[..., 1]).astype(np.int64), 0, h - 1)
            valid &= ~moving_u[rows, cols]
        source = np.flatnonzero(valid)
        fraction = len(source) / max(1, int(static.sum()))
        if len(source) > MAX_SAMPLES:
            rng = np.random.default_rng(1009 * t + u)
            source = np.sort(rng.choice(source, MAX_SAMPLES, replace=False))
        points = target.reshape(-1, 2)[source].astype(np.float32)
        return _Matches(t=t, u=u, source=source, target=points, fraction=fraction)

    def working(self, depth: np.ndarray) -> np.ndarray:
        """A full-size map at the working size (area average: the mean over its pixels)."""
        return resize_to(depth.astype(np.float32), self.size)


def _sample(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear values of a float32 HxW map at float (x, y) points [n, 2]."""
    if len(points) == 0:
        return np.zeros(0, np.float32)
    xy = np.asarray(points, dtype=np.float32)
    map_x = np.ascontiguousarray(xy[:, 0:1])
    map_y = np.ascontiguousarray(xy[:, 1:2])
    values = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return values.reshape(-1)


def _consecutive_matches(matcher: _Matcher, progress: Progress | None = None) -> list[_Matches]:
    pairs = []
    count = len(matcher.frames)
    for t in range(1, count):
        _check_cancel()
        pairs.append(matcher.match(t, t - 1))
        if t % 4 == 0 or t == count - 1:
            _report(progress, t / max(1, count - 1), f"flow: frame {t + 1} of {count}")
    return pairs


# --------------------------------------------------------------------------------------------
# The robust, symmetric affine fit


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    position = q * cumulative[-1]
    index = int(np.searchsorted(cumulative, position))
    return float(values[order][min(index, len(values) - 1)])


def _reduced_major_axis(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float] | None:
    """y ~ s * x + c with s = std(y) / std(x) (weighted), for positively correlated x, y:
    unbiased when both sides carry like noise, where least squares' slope shrinks."""
    total = w.sum()
    if not total > 0:
        return None
    mean_x, mean_y = float((w * x).sum() / total), float((w * y).sum() / total)
    dx, dy = x - mean_x, y - mean_y
    var_x, var_y = float((w * dx * dx).sum() / total), float((w * dy * dy).sum() / total)
    covariance = float((w * dx * dy).sum() / total)
    if not (var_x > 0 and var_y > 0 and covariance > 0):
        return None
    scale = float(np.sqrt(var_y / var_x))
    return scale, mean_y - scale * mean_x


@dataclass
class _Fit:
    scale: float
    shift: float
    residual: float
    """Median |y - (scale * x + shift)| over the inliers, in y's units."""
    inliers: int
    inlier_share: float


def _robust_affine(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> _Fit | None:
    """y ~ scale * x + shift, robustly: a start from the matched quartiles (outliers move a
    quartile little), then reduced-major-axis refits on the points within TRIM_SIGMAS robust
    sigmas of the last fit. None without enough points or a positive relation."""
    finite = np.isfinite(x) & np.isfinite(y) & (w > 0)
    x, y, w = x[finite].astype(np.float64), y[finite].astype(np.float64), w[finite]
    if len(x) < MIN_MATCHES:
        return None
    x_lo, x_hi = _weighted_quantile(x, w, 0.25), _weighted_quantile(x, w, 0.75)
    y_lo, y_hi = _weighted_quantile(y, w, 0.25), _weighted_quantile(y, w, 0.75)
    if x_hi > x_lo and y_hi > y_lo:
        scale = (y_hi - y_lo) / (x_hi - x_lo)
    else:  # a flat quartile range (much sky): the full spread instead
        fitted = _reduced_major_axis(x, y, w)
        if fitted is None:
            return None
        scale = fitted[0]
    shift = _weighted_quantile(y, w, 0.5) - scale * _weighted_quantile(x, w, 0.5)
    keep = np.ones(len(x), bool)
    for _ in range(FIT_ITERATIONS):
        residual = np.abs(y - (scale * x + shift))
        sigma = 1.4826 * float(np.median(residual[keep]))
        spread = float(np.std(y))
        threshold = max(TRIM_SIGMAS * sigma, 1e-6 * spread, 1e-12)
        new_keep = residual <= threshold
        if new_keep.sum() < MIN_MATCHES:
            break
        fitted = _reduced_major_axis(x[new_keep], y[new_keep], w[new_keep])
        if fitted is None:
            break
        scale, shift = fitted
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    residual = np.abs(y - (scale * x + shift))
    return _Fit(
        scale=float(scale),
        shift=float(shift),
        residual=float(np.median(residual[keep])),
        inliers=int(keep.sum()),
        inlier_share=float(keep.mean()),
    )


# --------------------------------------------------------------------------------------------
# 2. Alignment


@dataclass
class DepthAlignment:
    """How each frame was aligned: ``aligned = scales[t] * raw + shifts[t]`` (the shot's one
    normalisation included)."""

    scales: np.ndarray
    shifts: np.ndarray
    residuals: np.ndarray
    """Per frame: median |aligned - reference| over the fit's inlier matches, aligned units
    (0 for the first frame, nan for a frame with too few matches)."""
    matched_pixels: np.ndarray
    """Per frame: matches (flow and anchors) the final fit used."""
    methods: list[str] = field(default_factory=list)
    """Per frame: "reference" (the first frame, or anchors only), "flow", "flow+anchors",
    "anchors", or "distribution" (too few matches: fitted by its value quartiles)."""
    keyframes: list[int] = field(default_factory=list)
    confidences: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per frame 0..1: the fit's inlier share, times how small its residual is next to the
    shot's range (0 at RESIDUAL_TOLERANCE of it), times min(1, matches / 500). 1 for the
    first frame (it defines the chain), 0 for a distribution fit."""
    units: str = "normalised"
    """"normalised" (the shot's min..max is 0..1) or "anchors" (the anchors' inverse depth)."""


def _anchor_points(
    anchors: Sequence[Anchor | None] | None, count: int, width: int, height: int
) -> list[Anchor | None]:
    if anchors is None:
        return [None] * count
    if len(anchors) != count:
        raise InvalidInput(f"{len(anchors)} anchor entries for {count} frames")
    checked: list[Anchor | None] = []
    for index, anchor in enumerate(anchors):
        if anchor is None:
            checked.append(None)
            continue
        coords = np.asarray(anchor[0], np.float64).reshape(-1, 2)
        values = np.asarray(anchor[1], np.float64).reshape(-1)
        if len(coords) != len(values):
            raise InvalidInput(
                f"anchors[{index}]: {len(coords)} pixel coordinates, {len(values)} depths"
            )
        keep = (
            np.isfinite(coords).all(axis=1)
            & np.isfinite(values)
            & (coords[:, 0] >= 0)
            & (coords[:, 0] <= width - 1)
            & (coords[:, 1] >= 0)
            & (coords[:, 1] <= height - 1)
        )
        checked.append((coords[keep], values[keep]) if keep.any() else None)
    return checked


def _keyframe_plan(
    matcher: _Matcher, count: int, progress: Progress | None
) -> tuple[list[list[_Matches]], list[int]]:
    """For each frame its matches against its references (the previous frame, then the latest
    keyframes), and the keyframes. Depends on the images only, so it is computed once."""
    references: list[list[_Matches]] = [[]]
    keyframes = [0]
    for t in range(1, count):
        _check_cancel()
        refs = [t - 1, *[k for k in reversed(keyframes) if k != t - 1][:MAX_KEYFRAME_REFS]]
        matches = [matcher.match(t, u) for u in refs]
        references.append(matches)
        newest = next(m for m in matches if m.u == keyframes[-1])
        # Overlap relative to the previous frame's: flat regions (sky) fail the flow check
        # even between neighbours, and should not make every frame a keyframe.
        overlap = newest.fraction / max(matches[0].fraction, 1e-6)
        if t - keyframes[-1] >= KEYFRAME_GAP or overlap < KEYFRAME_OVERLAP:
            keyframes.append(t)
        if t % 4 == 0 or t == count - 1:
            _report(progress, t / max(1, count - 1), f"align: flow for frame {t + 1} of {count}")
    return references, keyframes


def _chain(
    raw_small: list[np.ndarray],
    raw_full: list[np.ndarray],
    references: list[list[_Matches]],
    anchors: list[Anchor | None],
    first: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, list[_Fit | None], list[str]]:
    """One sequential pass: each frame fitted to the frames before it (as already aligned in
    this pass) and to its own anchors, in the units `first` (the first frame's scale, shift)
    puts the chain in."""
    count = len(raw_small)
    scales, shifts = np.ones(count), np.zeros(count)
    fits: list[_Fit | None] = [None] * count
    methods = ["reference"] * count
    flat = [r.reshape(-1) for r in raw_small]
    for t in range(count):
        _check_cancel()
        xs, ys, ws = [], [], []
        for m in references[t]:
            if len(m.source) < MIN_MATCHES:
                continue
            xs.append(flat[t][m.source])
            ys.append(scales[m.u] * _sample(raw_small[m.u], m.target) + shifts[m.u])
            ws.append(np.full(len(m.source), 1.0 / len(m.source)))
        chained = bool(xs)
        anchor = anchors[t]
        if anchor is not None:
            coords, values = anchor
            share = ANCHOR_SHARE / (1 - ANCHOR_SHARE) * max(1, len(xs))
            xs.append(_sample(raw_full[t], coords))
            ys.append(values)
            ws.append(np.full(len(values), share / len(values)))
        fit = None
        if xs:
            fit = _robust_affine(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws))
        if fit is not None:
            scales[t], shifts[t] = fit.scale, fit.shift
            fits[t] = fit
            methods[t] = (
                "flow+anchors" if chained and anchor is not None else
                "flow" if chained else "anchors"
            )  # fmt: skip
        elif t == 0:
            scales[t], shifts[t] = first
        else:  # no usable matches: give it the previous frame's value quartiles
            scales[t], shifts[t] = _distribution_fit(raw_small[t], raw_small[t - 1])
            scales[t], shifts[t] = (
                scales[t - 1] * scales[t],
                scales[t - 1] * shifts[t] + shifts[t - 1],
            )
            methods[t] = "distribution"
    return scales, shifts, fits, methods


def _distribution_fit(raw: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Scale and shift taking `raw`'s quartiles onto `reference`'s."""
    x, y = raw[np.isfinite(raw)], reference[np.isfinite(reference)]
    if len(x) == 0 or len(y) == 0:
        return 1.0, 0.0
    x_lo, x_mid, x_hi = np.percentile(x, [25, 50, 75])
    y_lo, y_mid, y_hi = np.percentile(y, [25, 50, 75])
    scale = float((y_hi - y_lo) / (x_hi - x_lo)) if x_hi > x_lo and y_hi > y_lo else 1.0
    return scale, float(y_mid - scale * x_mid)


def _shot_range(depths: Sequence[np.ndarray]) -> tuple[float, float]:
    """The shot's finite min and max (0, 0 when nothing is finite)."""
    lo, hi = np.inf, -np.inf
    for depth in depths:
        finite = depth[np.isfinite(depth)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _hold_range(
    scales: np.ndarray,
    shifts: np.ndarray,
    raw_small: list[np.ndarray],
    window: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chain's slow drift taken out: per frame, the affine that takes the chained map's
    robust range (RANGE_PERCENTILES) to where its raw map's own range normalises it, smoothed
    over `window` frames (a running median, then a mean), applied to the chain.

    Why: matched static points keep their disparity only while the camera does not move
    towards or away from them; a camera that rises or dollies changes it for real, and the
    chain books that as a scale change, frame after frame (17 % over the test orbit's 48
    frames). A frame's own range has the opposite errors, none slow but noisy frame to frame;
    the smoothed difference keeps the chain's frame-to-frame agreement and the range's
    long-run level. Anchors, where given, do this job with real geometry instead. Returns the
    new scales and shifts, and the gain each frame's chained values were multiplied by."""
    count = len(raw_small)
    gains, offsets = np.ones(count), np.zeros(count)
    for t in range(count):
        chained = scales[t] * raw_small[t] + shifts[t]
        values = chained[np.isfinite(chained)]
        if values.size == 0:
            continue
        lo, hi = np.percentile(values, RANGE_PERCENTILES)
        if not hi > lo:
            continue
        gains[t] = 1.0 / (hi - lo)
        offsets[t] = -lo * gains[t]
    log_gain = _smooth(np.log(gains), window)
    offset = _smooth(offsets, window)
    gain = np.exp(log_gain)
    return scales * gain, shifts * gain + offset, gain


def _anchor_units(
    scales: np.ndarray,
    shifts: np.ndarray,
    raw_full: list[np.ndarray],
    points: list[Anchor | None],
) -> _Fit | None:
    """The affine from the chain's units to the anchors' (one robust fit over every anchor of
    the shot); None without anchors or without a positive relation."""
    xs, ys = [], []
    for t, anchor in enumerate(points):
        if anchor is not None:
            xs.append(scales[t] * _sample(raw_full[t], anchor[0]) + shifts[t])
            ys.append(anchor[1])
    if not xs:
        return None
    x, y = np.concatenate(xs), np.concatenate(ys)
    return _robust_affine(x, y, np.ones(len(x)))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """A running median (spikes out) then a running mean, both `window` frames, edges held."""
    half = max(1, window // 2)
    padded = np.pad(values, half, mode="edge")
    median = np.array([np.median(padded[i : i + 2 * half + 1]) for i in range(len(values))])
    padded = np.pad(median, half, mode="edge")
    return np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), mode="valid")


@dataclass
class _Aligned:
    depths: list[np.ndarray]
    alignment: DepthAlignment
    matcher: _Matcher
    consecutive: list[_Matches]


def _align(
    disparity: Sequence[np.ndarray],
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    anchors: Sequence[Anchor | None] | None,
    progress: Progress | None,
    range_window: int | None = None,
) -> _Aligned:
    if len(disparity) != len(frames):
        raise InvalidInput(f"{len(disparity)} disparity maps for {len(frames)} frames")
    matcher = _Matcher(frames, masks)
    width, height = matcher.full_size
    for index, raw in enumerate(disparity):
        if raw.shape != (height, width):
            raise InvalidInput(f"disparity {index} is {raw.shape}, its frame {(height, width)}")
    count = len(frames)
    points = _anchor_points(anchors, count, width, height)
    references, keyframes = _keyframe_plan(matcher, count, _scaled(progress, 0.0, 0.9))
    raw_full = [np.asarray(raw, np.float32) for raw in disparity]
    raw_small = [matcher.working(raw) for raw in raw_full]

    no_anchors: list[Anchor | None] = [None] * count
    scales, shifts, fits, methods = _chain(raw_small, raw_full, references, no_anchors, (1, 0))
    residuals = np.array([f.residual if f is not None else np.nan for f in fits])
    units = "normalised"
    to_anchors = _anchor_units(scales, shifts, raw_full, points)
    if to_anchors is not None:
        # Again with each frame's anchors in its own fit, the first frame in the anchors' units
        # (one fit over every anchor of the shot): they hold the chain where it drifted.
        first = (to_anchors.scale * scales[0], to_anchors.scale * shifts[0] + to_anchors.shift)
        scales, shifts, fits, methods = _chain(raw_small, raw_full, references, points, first)
        residuals = np.array([f.residual if f is not None else np.nan for f in fits])
        units = "anchors"
    elif range_window:
        scales, shifts, gains = _hold_range(scales, shifts, raw_small, range_window)
        residuals = residuals * gains
    residuals[0] = 0.0 if fits[0] is None else residuals[0]
    matched = np.array([f.inliers if f is not None else 0 for f in fits], np.int64)
    depths = [(scales[t] * raw_full[t] + shifts[t]).astype(np.float32) for t in range(count)]
    if units == "normalised":  # one normalisation for the whole shot: its min..max -> 0..1
        lo, hi = _shot_range(depths)
        gain = 1.0 / (hi - lo) if hi > lo else 1.0
        scales, shifts, residuals = scales * gain, (shifts - lo) * gain, residuals * gain
        depths = [((d - lo) * gain).astype(np.float32) for d in depths]
    lo, hi = _shot_range(depths)
    span = hi - lo if hi > lo else 1.0
    confidences = np.zeros(count)
    for t, fit in enumerate(fits):
        if methods[t] == "distribution":
            continue
        if fit is None or (t == 0 and methods[t] == "reference"):
            confidences[t] = 1.0
            continue
        closeness = max(0.0, 1.0 - residuals[t] / (RESIDUAL_TOLERANCE * span))
        confidences[t] = fit.inlier_share * closeness * min(1.0, fit.inliers / CONFIDENT_MATCHES)
    alignment = DepthAlignment(
        scales=scales.astype(np.float64),
        shifts=shifts.astype(np.float64),
        residuals=residuals,
        matched_pixels=matched,
        methods=methods,
        keyframes=keyframes,
        confidences=confidences,
        units=units,
    )
    consecutive = [next(m for m in references[t] if m.u == t - 1) for t in range(1, count)]
    _report(progress, 1.0, "align: done")
    return _Aligned(depths=depths, alignment=alignment, matcher=matcher, consecutive=consecutive)


def align_disparity(
    disparity: Sequence[np.ndarray],
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None = None,
    *,
    anchors: Sequence[Anchor | None] | None = None,
    range_window: int | None = RANGE_WINDOW,
    progress: Progress | None = None,
) -> tuple[list[np.ndarray], DepthAlignment]:
    """Per-frame relative disparity (each with its own scale and shift) -> one scale for the
    shot (see the module's docstring for how). `masks`: True on things that move; `anchors`
    per frame: (pixel coordinates [m, 2] as (x, y), known inverse depth [m]) or None;
    `range_window`: frames of the range hold (None: the chain alone). Returns
    the aligned maps (float32, each frame's size) and how each frame was aligned."""
    if not disparity:
        return [], DepthAlignment(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
    result = _align(disparity, frames, masks, anchors, progress, range_window)
    return result.depths, result.alignment


def normalise_per_frame(disparity: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The naive baseline the old backends used: each frame's own min..max to 0..1."""
    normalised = []
    for raw in disparity:
        lo, hi = _shot_range([raw])
        span = hi - lo if hi > lo else 1.0
        normalised.append(((raw - lo) / span).astype(np.float32))
    return normalised


# --------------------------------------------------------------------------------------------
# Metrics


def _flicker(depths: Sequence[np.ndarray], matcher: _Matcher, pairs: list[_Matches]) -> float:
    small = [matcher.working(d) for d in depths]
    values = np.concatenate([s.reshape(-1)[np.isfinite(s.reshape(-1))] for s in small])
    if values.size == 0:
        return float("nan")
    lo, hi = np.percentile(values, [1, 99])
    span = float(hi - lo) if hi > lo else 1.0
    per_pair = []
    for m in pairs:
        if len(m.source) == 0:
            continue
        here = small[m.t].reshape(-1)[m.source]
        there = _sample(small[m.u], m.target)
        difference = np.abs(here - there)
        difference = difference[np.isfinite(difference)]
        if difference.size:
            per_pair.append(float(difference.mean()))
    return float(np.mean(per_pair)) / span if per_pair else float("nan")


def flicker(
    depths: Sequence[np.ndarray],
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None = None,
) -> float:
    """Temporal flicker, lower is better: over each pair of consecutive frames, the mean
    |d_t(x) - d_{t-1}(x')| over static pixels x of frame t matched by flow to x' in frame t-1
    (the alignment's matching: DIS, forward-backward checked, outside the dilated masks, at
    most FLOW_MAX_SIDE), averaged over the pairs and divided by the shot's depth range (the
    1st..99th percentile of all its values), so maps of any units compare. A static point's
    depth does change a little as the camera moves, so true depth scores a small floor too."""
    if len(depths) != len(frames):
        raise InvalidInput(f"{len(depths)} depth maps for {len(frames)} frames")
    if len(frames) < 2:
        return 0.0
    matcher = _Matcher(frames, masks)
    return _flicker(depths, matcher, _consecutive_matches(matcher))


def _edge_stability(
    depths: Sequence[np.ndarray], masks: Sequence[np.ndarray], span: float
) -> float | None:
    """1 - the mean change, frame to frame, of the depth step across the subject's boundary
    (median just inside minus median just outside, EDGE_BAND_PX wide), relative to the step's
    own median size; None without a subject in two consecutive frames."""
    kernel = cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (2 * EDGE_BAND_PX + 1, 2 * EDGE_BAND_PX + 1)
    )
    steps: list[float | None] = []
    for depth, mask in zip(depths, masks, strict=True):
        if mask is None or not mask.any():
            steps.append(None)
            continue
        mask = np.asarray(mask, bool)
        as_bytes = mask.astype(np.uint8)
        inner = mask & ~(cv2.erode(as_bytes, kernel) > 0)
        outer = (cv2.dilate(as_bytes, kernel) > 0) & ~mask
        inside, outside = depth[inner], depth[outer]
        inside, outside = inside[np.isfinite(inside)], outside[np.isfinite(outside)]
        if inside.size == 0 or outside.size == 0:
            steps.append(None)
            continue
        steps.append(float(np.median(inside) - np.median(outside)) / span)
    changes = [abs(b - a) for a, b in itertools.pairwise(steps) if a is not None and b is not None]
    sizes = [abs(s) for s in steps if s is not None]
    if not changes:
        return None
    typical = max(float(np.median(sizes)), 1e-3)
    return max(0.0, 1.0 - float(np.mean(changes)) / typical)


# --------------------------------------------------------------------------------------------
# 3. The whole stage


@dataclass
class ConsistentDepth:
    depths: list[np.ndarray]
    """Aligned disparity per frame (float32, the frame's size; larger is nearer)."""
    lo: float
    hi: float
    """The shot's one PNG range: `value = lo + png / 65535 * (hi - lo)` for every frame."""
    alignment: DepthAlignment
    quality: dict[str, Any] = field(default_factory=dict)
    flicker: float = float("nan")
    """`flicker` of `depths` (measured with the alignment's own matches)."""
    raw_flicker: float = float("nan")
    """The same metric on the model's raw per-frame maps normalised per frame (the baseline)."""

    def png16(self, index: int) -> bytes:
        return depth_to_png16(self.depths[index], self.lo, self.hi)


def consistent_depth(
    loaded_model: LoadedModel,
    frames: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None = None,
    *,
    input_size: int | None = None,
    anchors: Sequence[Anchor | None] | None = None,
    range_window: int | None = RANGE_WINDOW,
    progress: Progress | None = None,
) -> ConsistentDepth:
    """The model on every frame, aligned to one scale for the shot, with its PNG range and
    quality numbers (`depth_quality`)."""
    if not frames:
        raise InvalidInput("no frames for video depth")
    raw = estimate_disparity(
        loaded_model, frames, input_size=input_size, progress=_scaled(progress, 0.0, 0.7)
    )
    aligned = _align(raw, frames, masks, anchors, _scaled(progress, 0.7, 0.97), range_window)
    lo, hi = _shot_range(aligned.depths)
    result = ConsistentDepth(depths=aligned.depths, lo=lo, hi=hi, alignment=aligned.alignment)
    result.flicker = _flicker(aligned.depths, aligned.matcher, aligned.consecutive)
    result.raw_flicker = _flicker(normalise_per_frame(raw), aligned.matcher, aligned.consecutive)
    result.quality = depth_quality(result, masks)
    _report(progress, 1.0, "depth: done")
    return result


def depth_quality(result: ConsistentDepth, masks: Sequence[np.ndarray] | None = None) -> dict:
    """Orbit's depth metrics: temporal_consistency = max(0, 1 - 5 * flicker) (0..1, higher is
    better, as its old backend scored it); edge_stability (0..1, None without masks: how
    steady the depth step across the subject's boundary stays); frame_confidences (the
    alignment's, 0..1); flicker; score = the mean of the three (those present)."""
    flicker_value = result.flicker
    temporal = max(0.0, 1.0 - FLICKER_WEIGHT * flicker_value) if np.isfinite(flicker_value) else 0.0
    span = result.hi - result.lo if result.hi > result.lo else 1.0
    edge = None if masks is None else _edge_stability(result.depths, masks, span)
    confidences = [round(float(c), 4) for c in result.alignment.confidences]
    parts = [temporal, float(np.mean(confidences)) if confidences else 0.0]
    if edge is not None:
        parts.append(edge)
    return {
        "temporal_consistency": round(temporal, 4),
        "edge_stability": None if edge is None else round(edge, 4),
        "frame_confidences": confidences,
        "flicker": round(float(flicker_value), 6) if np.isfinite(flicker_value) else None,
        "score": round(float(np.mean(parts)), 4),
    }
