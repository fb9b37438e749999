"""core/stages/video_depth.py: consistent video depth, proven on a rendered clip with known truth.

The clip (tests/orbit_scene.py) has true z-depth per pixel. A simulated per-frame relative-depth
model turns it into what Depth Anything gives: the true inverse depth with its own random scale
and shift per frame, pixel noise, a slowly changing smooth error, and a few wild pixels (as a
real model has at thin structures and edges; they are what set a frame's min and max). What is
proven, with the numbers printed:

* the aligned maps are the true inverse depth up to ONE affine for the whole shot, and their
  per-frame scale against the truth barely moves; per-frame min/max normalisation does worse;
* the aligned maps flicker several times less than per-frame normalisation;
* anchors (true inverse depth at a few hundred pixels of every 4th frame) give the result in
  their units and hold the scale closer than the chain alone;
* through the real loader: a random-weight Depth Anything gives finite maps of the frame size
  and 16-bit PNGs that decode back to them; cancellation stops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.control import JobControl, bind
from core.errors import Cancelled, InvalidInput
from core.stages import video_depth as vd
from tests.orbit_scene import OrbitClip, orbit_clip

FRAMES = 48


@dataclass
class Simulated:
    clip: OrbitClip
    inverse: list[np.ndarray]
    """True inverse depth (0 for sky)."""
    raw: list[np.ndarray]
    """The simulated model's output: its own scale and shift per frame, and its errors."""


def simulate_model(clip: OrbitClip, seed: int = 0) -> Simulated:
    rng = np.random.default_rng(seed)
    inverse = [np.where(np.isfinite(z), 1.0 / z, 0.0) for z in clip.depth]
    height, width = inverse[0].shape
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    raw = []
    for t, truth in enumerate(inverse):
        scale, shift = rng.uniform(0.5, 3.0), rng.uniform(-0.5, 0.5)
        phase = 0.05 * t  # the smooth error drifts slowly, as a model's does on a moving view
        smooth = 0.005 * (np.sin(2 * np.pi * xs + 0.3 + phase) + np.cos(2 * np.pi * ys + phase))
        error = truth + smooth + 0.002 * rng.standard_normal((height, width))
        wild = rng.choice(error.size, error.size // 2000, replace=False)
        error.reshape(-1)[wild] += rng.uniform(-0.08, 0.08, len(wild))
        raw.append((scale * error + shift).astype(np.float32))
    return Simulated(clip=clip, inverse=inverse, raw=raw)


@pytest.fixture(scope="module")
def sim() -> Simulated:
    return simulate_model(orbit_clip(FRAMES, with_background=False))


@pytest.fixture(scope="module")
def aligned(sim: Simulated) -> tuple[list[np.ndarray], vd.DepthAlignment]:
    return vd.align_disparity(sim.raw, sim.clip.frames, sim.clip.masks)


def global_affine_error(depths: list[np.ndarray], inverse: list[np.ndarray]) -> float:
    """Median relative error of the true inverse depth read back through ONE affine fitted over
    every (non-sky) pixel of the shot."""
    seen = np.concatenate([(i > 0).ravel() for i in inverse])
    truth = np.concatenate([i.ravel() for i in inverse])[seen]
    values = np.concatenate([d.ravel() for d in depths])[seen].astype(np.float64)
    design = np.stack([truth, np.ones_like(truth)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, values, rcond=None)
    return float(np.median(np.abs((values - b) / a - truth) / truth))


def scale_drift(depths: list[np.ndarray], sim: Simulated) -> float:
    """How far each frame's own scale against the truth (a least-squares line on the static,
    non-sky pixels) strays from the shot's median: the largest relative deviation."""
    slopes = []
    for depth, truth, mask in zip(depths, sim.inverse, sim.clip.masks, strict=True):
        keep = (truth > 0) & ~mask
        slopes.append(np.polyfit(truth[keep], depth[keep], 1)[0])
    slopes_arr = np.array(slopes)
    return float(np.max(np.abs(slopes_arr / np.median(slopes_arr) - 1)))


def anchors_every(sim: Simulated, step: int, count: int, seed: int = 1) -> list[Any]:
    rng = np.random.default_rng(seed)
    anchors: list[Any] = []
    for t, (truth, mask) in enumerate(zip(sim.inverse, sim.clip.masks, strict=True)):
        if t % step:
            anchors.append(None)
            continue
        candidates = np.flatnonzero(((truth > 0) & ~mask).ravel())
        picked = rng.choice(candidates, count, replace=False)
        rows, cols = np.unravel_index(picked, truth.shape)
        anchors.append((np.stack([cols, rows], axis=1).astype(float), truth.ravel()[picked]))
    return anchors


# ----------------------------------------------------------------------------------------------
# Accuracy on the rendered clip


def test_aligned_depth_is_truth_up_to_one_affine(sim: Simulated, aligned: Any) -> None:
    depths, alignment = aligned
    baseline = vd.normalise_per_frame(sim.raw)
    error = global_affine_error(depths, sim.inverse)
    baseline_error = global_affine_error(baseline, sim.inverse)
    raw_error = global_affine_error(sim.raw, sim.inverse)
    drift, baseline_drift = scale_drift(depths, sim), scale_drift(baseline, sim)
    print(
        f"\none-affine median relative error: aligned {error:.4f}, per-frame min/max "
        f"{baseline_error:.4f}, raw {raw_error:.4f}; scale drift aligned {drift:.4f}, "
        f"per-frame {baseline_drift:.4f}; keyframes {alignment.keyframes}"
    )
    assert error < 0.03
    assert error < baseline_error
    assert raw_error > 0.3  # the simulated model really does have a scale per frame
    assert drift < baseline_drift
    assert drift < 0.06
    assert all(np.isfinite(d).all() and d.shape == sim.raw[0].shape for d in depths)
    assert depths[0].dtype == np.float32
    # One normalisation for the whole shot: its min..max is 0..1, not each frame's.
    assert min(float(d.min()) for d in depths) == pytest.approx(0.0, abs=1e-6)
    assert max(float(d.max()) for d in depths) == pytest.approx(1.0, abs=1e-6)
    # The alignment's record reproduces the maps.
    for t in (0, 17, FRAMES - 1):
        expected = alignment.scales[t] * sim.raw[t] + alignment.shifts[t]
        np.testing.assert_allclose(depths[t], expected, rtol=1e-4, atol=1e-5)
    assert alignment.methods[0] == "reference"
    assert set(alignment.methods[1:]) == {"flow"}
    assert (alignment.matched_pixels[1:] >= vd.MIN_MATCHES).all()
    assert np.isfinite(alignment.residuals).all()
    assert ((alignment.confidences > 0.3) & (alignment.confidences <= 1)).all()


def test_aligned_depth_flickers_less_than_per_frame_normalisation(
    sim: Simulated, aligned: Any
) -> None:
    depths, _ = aligned
    clip = sim.clip
    aligned_flicker = vd.flicker(depths, clip.frames, clip.masks)
    baseline_flicker = vd.flicker(vd.normalise_per_frame(sim.raw), clip.frames, clip.masks)
    truth_flicker = vd.flicker(sim.inverse, clip.frames, clip.masks)
    factor = baseline_flicker / aligned_flicker
    print(
        f"\nflicker: aligned {aligned_flicker:.5f}, per-frame min/max {baseline_flicker:.5f} "
        f"({factor:.2f}x), true inverse depth {truth_flicker:.5f} (the camera's own motion)"
    )
    assert factor >= 2.5
    assert truth_flicker < aligned_flicker < baseline_flicker


def test_anchors_hold_the_scale_and_give_their_units(sim: Simulated, aligned: Any) -> None:
    clip = sim.clip
    anchors = anchors_every(sim, 4, 300)
    chained, _ = vd.align_disparity(sim.raw, clip.frames, clip.masks, range_window=None)
    anchored, alignment = vd.align_disparity(sim.raw, clip.frames, clip.masks, anchors=anchors)
    chain_drift, anchored_drift = scale_drift(chained, sim), scale_drift(anchored, sim)
    seen = [(i > 0) & ~m for i, m in zip(sim.inverse, clip.masks, strict=True)]
    direct = float(
        np.median(
            np.concatenate(
                [
                    np.abs(d[s] - i[s]) / i[s]
                    for d, i, s in zip(anchored, sim.inverse, seen, strict=True)
                ]
            )
        )
    )
    held_drift = scale_drift(aligned[0], sim)
    print(
        f"\nscale drift: chain only {chain_drift:.4f}, with the range hold (default) "
        f"{held_drift:.4f}, with anchors {anchored_drift:.4f}; "
        f"anchored result against the true inverse depth itself: median error {direct:.4f}"
    )
    assert anchored_drift < 0.6 * chain_drift
    assert held_drift < 0.6 * chain_drift  # the camera's rise and fall, booked by the chain
    assert alignment.units == "anchors"
    assert direct < 0.03  # no affine fitted here: the result is in the anchors' units
    assert alignment.methods[0] == "anchors" and alignment.methods[4] == "flow+anchors"
    assert alignment.methods[1] == "flow"


def test_a_frame_without_static_matches_falls_back(sim: Simulated) -> None:
    clip = sim.clip
    masks = [m.copy() for m in clip.masks[:5]]
    masks[2][:] = True  # nothing static to match: as after a cut, or a subject filling the view
    depths, alignment = vd.align_disparity(sim.raw[:5], clip.frames[:5], masks)
    assert alignment.methods[2] == "distribution"
    assert alignment.confidences[2] == 0.0 and np.isnan(alignment.residuals[2])
    assert alignment.methods[3] == "flow" and alignment.confidences[3] > 0.3
    assert all(np.isfinite(d).all() for d in depths)


def test_flicker_metric_sees_a_scale_jump(sim: Simulated) -> None:
    clip = sim.clip
    frames, truth = clip.frames[:6], sim.inverse[:6]
    jumped = [d * (1.3 if t == 3 else 1.0) for t, d in enumerate(truth)]
    steady, jumpy = vd.flicker(truth, frames), vd.flicker(jumped, frames)
    assert jumpy > 3 * steady
    assert vd.flicker(truth[:1], frames[:1]) == 0.0


def test_quality_numbers(sim: Simulated, aligned: Any) -> None:
    depths, alignment = aligned
    lo, hi = vd._shot_range(depths)
    result = vd.ConsistentDepth(depths=depths, lo=lo, hi=hi, alignment=alignment)
    result.flicker = vd.flicker(depths, sim.clip.frames, sim.clip.masks)
    quality = vd.depth_quality(result, sim.clip.masks)
    print(f"\nquality: { {k: v for k, v in quality.items() if k != 'frame_confidences'} }")
    assert quality["temporal_consistency"] == pytest.approx(max(0, 1 - 5 * result.flicker), 1e-3)
    assert 0.9 < quality["temporal_consistency"] <= 1
    assert quality["edge_stability"] is not None and 0.5 < quality["edge_stability"] <= 1
    assert len(quality["frame_confidences"]) == FRAMES
    assert 0 < quality["score"] <= 1
    # A frame whose depth is flipped breaks the edge's steadiness.
    broken = [1.0 - d if t % 2 else d for t, d in enumerate(depths)]
    result.depths = broken
    assert vd.depth_quality(result, sim.clip.masks)["edge_stability"] < quality["edge_stability"]
    assert vd.depth_quality(result, None)["edge_stability"] is None


def test_bad_inputs_are_named(sim: Simulated) -> None:
    frames = sim.clip.frames[:3]
    with pytest.raises(InvalidInput, match="disparity maps"):
        vd.align_disparity(sim.raw[:2], frames)
    with pytest.raises(InvalidInput, match="masks"):
        vd.align_disparity(sim.raw[:3], frames, sim.clip.masks[:2])
    with pytest.raises(InvalidInput, match="anchor"):
        vd.align_disparity(sim.raw[:3], frames, anchors=[None])
    assert vd.align_disparity([], [])[0] == []


def test_png16_round_trip_over_the_shot_range(sim: Simulated, aligned: Any) -> None:
    depths, _ = aligned
    lo, hi = vd._shot_range(depths)
    for depth in (depths[0], depths[-1]):
        png = vd.depth_to_png16(depth, lo, hi)
        levels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert levels is not None
        assert levels.dtype == np.uint16 and levels.shape == depth.shape
        back = lo + levels.astype(np.float64) / 65535 * (hi - lo)
        assert np.abs(back - depth).max() <= (hi - lo) / 65535


# ----------------------------------------------------------------------------------------------
# Through the real model loading


@pytest.fixture()
def depth_model(weights_dir: Path, inprocess: Any) -> Any:
    """A random-weight Depth Anything V2 Small in the test's WEIGHTS_DIR, loaded the worker's
    way (`inprocess` points the settings at it)."""
    from core.tasks.depth import DEFAULT_MODEL, load_depth
    from scripts.make_test_weights_depth import make_depth_checkpoint

    if not (weights_dir / DEFAULT_MODEL / "config.json").exists():
        make_depth_checkpoint(weights_dir)
    return load_depth(DEFAULT_MODEL)


def small_frames(sim: Simulated, count: int) -> list[np.ndarray]:
    return [
        cv2.resize(f, (160, 120), interpolation=cv2.INTER_AREA) for f in sim.clip.frames[:count]
    ]


def test_consistent_depth_end_to_end(sim: Simulated, depth_model: Any) -> None:
    frames = small_frames(sim, 8)
    masks = [cv2.resize(m.astype(np.uint8), (160, 120)) > 0 for m in sim.clip.masks[:8]]
    reports: list[float] = []
    result = vd.consistent_depth(
        depth_model, frames, masks, input_size=140, progress=lambda f, _m: reports.append(f)
    )
    assert len(result.depths) == 8
    assert all(d.shape == (120, 160) and d.dtype == np.float32 for d in result.depths)
    assert all(np.isfinite(d).all() for d in result.depths)
    assert result.lo < result.hi
    assert result.lo == min(float(d.min()) for d in result.depths)
    assert reports and reports[-1] == 1.0 and reports == sorted(reports)
    assert set(result.quality) >= {
        "temporal_consistency", "edge_stability", "frame_confidences", "flicker", "score"
    }  # fmt: skip
    span = result.hi - result.lo
    for index in (0, 7):
        levels = cv2.imdecode(np.frombuffer(result.png16(index), np.uint8), cv2.IMREAD_UNCHANGED)
        assert levels is not None
        assert levels.dtype == np.uint16 and levels.shape == (120, 160)
        back = result.lo + levels.astype(np.float64) / 65535 * span
        assert np.abs(back - result.depths[index]).max() <= span / 65535
    # estimate_disparity is the model's own output: each frame's map, scale and shift undone.
    raw = vd.estimate_disparity(depth_model, frames[:2], input_size=140, batch=2)
    a = result.alignment
    np.testing.assert_allclose(result.depths[1], a.scales[1] * raw[1] + a.shifts[1], atol=1e-4)


def test_cancel_stops_estimation_and_alignment(sim: Simulated, depth_model: Any) -> None:
    control = JobControl(job_id="cancel-me", report_progress=lambda *_: None)
    control.request_stop("cancelled")
    frames = small_frames(sim, 3)
    with bind(control):
        with pytest.raises(Cancelled):
            vd.estimate_disparity(depth_model, frames, input_size=140)
        with pytest.raises(Cancelled):
            vd.align_disparity(sim.raw[:3], sim.clip.frames[:3])
