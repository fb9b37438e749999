"""Point tracks (core/stages/tracks.py) against the rendered Orbit clip's truth.

Truth for a track: its seed pixel at its query frame is cast into the scene (exact ray-quad
intersection, checked against the clip's depth map at that pixel), which gives the 3D
surface point it should follow (a subject point is moved back to its frame-0 placement);
``track_truth`` then projects that point into every frame with its visibility.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from core.control import JobControl, bind
from core.errors import Cancelled
from core.stages.tracks import (
    LucasKanadeTracker,
    Tracks,
    filter_tracks,
    seed_points,
    track_clip,
    track_quality,
    tracks_document,
)
from tests.orbit_scene import OrbitClip, orbit_clip, track_truth


def cast_pixel(clip: OrbitClip, frame: int, xy: np.ndarray) -> tuple[np.ndarray | None, float, int]:
    """(world point, z-depth, quad index into ``clip.quads_at(frame)``) the ray through pixel
    ``xy`` (pixel centres at +0.5) hits first; (None, inf, -1) for sky."""
    rot, t = clip.poses[frame]
    origin = -rot.T @ t
    ray = (np.linalg.inv(clip.k) @ np.array([xy[0], xy[1], 1.0])) @ rot  # z-depth 1 along it
    best, hit, which = np.inf, None, -1
    for number, quad in enumerate(clip.quads_at(frame)):
        normal = np.cross(quad.u, quad.v)
        facing = ray @ normal
        if abs(facing) < 1e-12:
            continue
        dist = ((quad.origin - origin) @ normal) / facing
        if not 1e-6 < dist < best:
            continue
        local = origin + dist * ray - quad.origin
        a = local @ quad.u / (quad.u @ quad.u)
        b = local @ quad.v / (quad.v @ quad.v)
        if 0 <= a <= 1 and 0 <= b <= 1:
            best, hit, which = dist, origin + dist * ray, number
    return hit, best, which


def tracks_truth(clip: OrbitClip, tracks: Tracks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions [n, F, 2], visible [n, F], usable [n]) of each track's true point. A track is
    unusable when its seed pixel mixes surfaces (the depth map there is not the ray's hit
    within 2 %: no single true point) or shows the other group's surface."""
    n, frame_count = len(tracks), tracks.frame_count
    positions = np.zeros((n, frame_count, 2))
    visible = np.zeros((n, frame_count), bool)
    usable = np.zeros(n, bool)
    n_background = len(clip.background_quads)
    for i in range(n):
        q = int(tracks.query_frame[i])
        xy = tracks.positions[i, q].astype(np.float64)
        world, depth, which = cast_pixel(clip, q, xy)
        if world is None:
            continue
        seen = clip.depth[q][int(xy[1]), int(xy[0])]
        subject = which >= n_background
        if not abs(seen - depth) <= 0.02 * depth or subject != bool(tracks.on_subject[i]):
            continue
        if subject:
            world = world - (clip.subject_offsets[q] - clip.subject_offsets[0])
        truth, truly_visible = track_truth(clip, world[None], subject)
        positions[i], visible[i], usable[i] = truth[0, :frame_count], truly_visible[0], True
    return positions, visible, usable


def accuracy(clip: OrbitClip, tracks: Tracks) -> dict[str, float]:
    """The numbers the tests assert and the benchmark prints."""
    truth, truly_visible, usable = tracks_truth(clip, tracks)
    frames = np.arange(tracks.frame_count)
    tracked_span = frames[None, :] >= tracks.query_frame[:, None]
    error = np.linalg.norm(tracks.positions - truth, axis=2)
    out: dict[str, float] = {"tracks": len(tracks), "usable": int(usable.sum())}
    for group, members in (("subject", tracks.on_subject), ("background", ~tracks.on_subject)):
        rows = members & usable
        both = tracks.visible[rows] & truly_visible[rows]
        hidden = ~truly_visible[rows] & tracked_span[rows]
        out[f"{group}_samples"] = int(both.sum())
        out[f"{group}_within_2px"] = float((error[rows][both] < 2.0).mean())
        out[f"{group}_occluded_samples"] = int(hidden.sum())
        out[f"{group}_occlusion_flagged"] = float((~tracks.visible[rows][hidden]).mean())
        out[f"{group}_recall"] = float(
            both.sum() / max(1, (truly_visible[rows] & tracked_span[rows]).sum())
        )
    # Hidden by the subject (in the image, not visible): what the occlusion check is for.
    rows = ~tracks.on_subject & usable
    inside = (
        (truth[rows, :, 0] >= 1)
        & (truth[rows, :, 0] <= clip.width - 1)
        & (truth[rows, :, 1] >= 1)
        & (truth[rows, :, 1] <= clip.height - 1)
    )
    behind = inside & ~truly_visible[rows] & tracked_span[rows]
    out["background_hidden_by_subject"] = int(behind.sum())
    out["hidden_flagged"] = float((~tracks.visible[rows][behind]).mean())
    return out


@pytest.fixture(scope="module")
def crossing() -> OrbitClip:
    """The subject crosses the frame on its own: it passes over many background points."""
    return orbit_clip(48, follow=False, with_background=False)


@pytest.fixture(scope="module")
def following() -> OrbitClip:
    """The subject walks with the camera: its texture sits nearly still in the image."""
    return orbit_clip(48, follow=True, with_background=False)


@pytest.fixture(scope="module")
def crossing_tracks(crossing: OrbitClip) -> Tracks:
    return track_clip(crossing.frames, crossing.masks)


def check_accuracy(clip: OrbitClip, tracks: Tracks) -> dict[str, float]:
    numbers = accuracy(clip, tracks)
    assert numbers["usable"] >= 0.9 * numbers["tracks"], numbers  # the truth itself holds
    for group in ("subject", "background"):
        assert numbers[f"{group}_samples"] > 2000, numbers
        assert numbers[f"{group}_within_2px"] >= 0.90, numbers
        # Tracks are kept for most of what could be tracked (it is not won by giving up).
        assert numbers[f"{group}_recall"] >= 0.55, numbers
        assert numbers[f"{group}_occlusion_flagged"] >= 0.80, numbers
    return numbers


def test_tracks_match_truth_as_the_subject_crosses(
    crossing: OrbitClip, crossing_tracks: Tracks
) -> None:
    numbers = check_accuracy(crossing, crossing_tracks)
    # The clip really has occlusions: background points the subject passes over.
    assert numbers["background_hidden_by_subject"] > 300, numbers
    assert numbers["hidden_flagged"] >= 0.80, numbers
    assert numbers["background_occluded_samples"] > 1000, numbers


def test_tracks_match_truth_as_the_subject_follows(following: OrbitClip) -> None:
    tracks = track_clip(following.frames, following.masks)
    numbers = check_accuracy(following, tracks)
    assert numbers["background_hidden_by_subject"] > 100, numbers
    assert numbers["hidden_flagged"] >= 0.80, numbers


def test_tracks_are_seeded_on_both_sides_and_refilled(
    crossing: OrbitClip, crossing_tracks: Tracks
) -> None:
    tracks = crossing_tracks
    starts = tracks.positions[np.arange(len(tracks)), tracks.query_frame]
    for i in range(len(tracks)):
        col, row = int(starts[i, 0]), int(starts[i, 1])
        assert crossing.masks[tracks.query_frame[i]][row, col] == tracks.on_subject[i]
    first = tracks.query_frame == 0
    # As many corners as the texture offers at min_distance 6, up to the targets (200, 300).
    assert 150 <= (first & tracks.on_subject).sum() <= 200
    assert 130 <= (first & ~tracks.on_subject).sum() <= 300
    # Refills happen on the reseed frames only, and nothing is visible before its query frame.
    assert set(np.unique(tracks.query_frame)) <= set(range(0, 48, 8))
    assert len(np.unique(tracks.query_frame)) >= 3
    for i in range(len(tracks)):
        assert not tracks.visible[i, : tracks.query_frame[i]].any()
        seen = np.flatnonzero(tracks.visible[i])
        # Once lost, a track stays lost: its visible frames are one unbroken run.
        assert len(seen) == 0 or seen[-1] - seen[0] + 1 == len(seen)
    assert (tracks.confidence[~tracks.visible] == 0).all()
    conf = tracks.confidence[tracks.visible]
    assert conf.min() >= 0 and conf.max() <= 1 and np.median(conf) > 0.6


def test_gate_keeps_accurate_tracks(crossing: OrbitClip, crossing_tracks: Tracks) -> None:
    keep = filter_tracks(crossing_tracks)
    assert keep.sum() >= 150
    kept = Tracks(
        crossing_tracks.positions[keep],
        crossing_tracks.visible[keep],
        crossing_tracks.confidence[keep],
        crossing_tracks.query_frame[keep],
        crossing_tracks.on_subject[keep],
    )
    numbers = accuracy(crossing, kept)
    assert numbers["subject_within_2px"] >= 0.93, numbers
    assert numbers["background_within_2px"] >= 0.93, numbers
    quality = track_quality(crossing_tracks, keep)
    assert quality["num_tracks_kept"] == int(keep.sum())
    assert quality["subject_tracks_kept"] > 50 and quality["background_tracks_kept"] > 50
    assert 0 < quality["score"] <= 1


def truth_tracks(clip: OrbitClip, tracks: Tracks) -> Tracks:
    """The tracker's seeds followed exactly (truth positions, truth visibility from the
    query frame until first hidden)."""
    truth, truly_visible, usable = tracks_truth(clip, tracks)
    span = np.arange(tracks.frame_count)[None, :] >= tracks.query_frame[:, None]
    visible = truly_visible & span & usable[:, None]
    visible &= ~(np.cumsum(~visible & span, axis=1) > 0)
    return Tracks(
        truth.astype(np.float32),
        visible,
        visible.astype(np.float32),
        tracks.query_frame.copy(),
        tracks.on_subject.copy(),
    )


def test_filter_drops_tracks_drifting_against_their_neighbours(
    crossing: OrbitClip, crossing_tracks: Tracks
) -> None:
    true = truth_tracks(crossing, crossing_tracks)
    long = np.flatnonzero((true.lifespans() >= 40) & ~true.on_subject)[:15]
    # Copies of true background tracks that slide 1 px a frame off them: each frame moves
    # little against its neighbours (the original among them), but 8 frames add 8 px.
    drift = np.zeros((len(long), true.frame_count, 2), np.float32)
    drift[:, :, 0] = np.arange(true.frame_count)
    tracks = Tracks(
        np.concatenate([true.positions, true.positions[long] + drift]),
        np.concatenate([true.visible, true.visible[long]]),
        np.concatenate([true.confidence, true.confidence[long]]),
        np.concatenate([true.query_frame, true.query_frame[long]]),
        np.concatenate([true.on_subject, np.zeros(len(long), bool)]),
    )
    n = len(true)
    keep = filter_tracks(tracks)
    assert len(long) == 15
    assert keep[n:].mean() <= 0.2  # the drifting copies go
    eligible = tracks.lifespans()[:n] >= 15
    assert keep[:n][eligible].mean() >= 0.88  # true tracks pass the local-motion test
    assert keep[long].mean() >= 0.8
    assert not keep[:n][~eligible].any()  # too short
    # Low confidence alone drops a track.
    base = int(long[0])
    assert keep[base]
    tracks.confidence[base] = np.where(tracks.visible[base], 0.5, 0.0)
    assert not filter_tracks(tracks)[base]


def small_tracks() -> Tracks:
    """Four tracks over 20 frames, counted by hand below."""
    frames = 20
    positions = np.zeros((4, frames, 2), np.float32)
    for i in range(4):  # all translate alike: no residual
        positions[i, :, 0] = 10 + 20 * i + np.arange(frames)
        positions[i, :, 1] = 50
    visible = np.zeros((4, frames), bool)
    visible[0, :] = True  # 20 frames
    visible[1, 2:18] = True  # 16 frames
    visible[2, 5:15] = True  # 10 frames: too short
    visible[3, :] = True  # 20 frames, confidence too low
    confidence = np.where(visible, 0.9, 0.0).astype(np.float32)
    confidence[1] = np.where(visible[1], 0.7, 0.0)
    confidence[3] = np.where(visible[3], 0.4, 0.0)
    return Tracks(
        positions,
        visible,
        confidence,
        np.array([0, 2, 5, 0]),
        np.array([True, False, True, False]),
    )


def test_filter_and_quality_match_hand_counts() -> None:
    tracks = small_tracks()
    assert tracks.lifespans().tolist() == [20, 16, 10, 20]
    keep = filter_tracks(tracks)
    assert keep.tolist() == [True, True, False, False]
    quality = track_quality(tracks, keep)
    assert quality == {
        "num_tracks_kept": 2,
        "num_tracks_discarded": 2,
        "median_lifespan": 18.0,
        "median_confidence": pytest.approx(0.8),
        "subject_tracks_kept": 1,
        "background_tracks_kept": 1,
        # share kept 2/4 x median confidence 0.8 x median lifespan 18 / 20 frames
        "score": pytest.approx(0.5 * 0.8 * 0.9),
    }
    none = track_quality(tracks, np.zeros(4, bool))
    assert none["num_tracks_kept"] == 0 and none["score"] == 0.0


def test_document_is_json_and_round_trips(crossing_tracks: Tracks) -> None:
    tracks = crossing_tracks
    keep = filter_tracks(tracks)
    sources = [3 * f + 7 for f in range(tracks.frame_count)]  # every third source frame
    document = json.loads(json.dumps(tracks_document(tracks, keep, 12.0, sources)))
    assert document["format"] == "orbit-tracks/1"
    assert document["fps"] == 12.0 and document["frame_count"] == tracks.frame_count
    assert len(document["tracks"]) == int(keep.sum())
    for entry in document["tracks"]:
        i = entry["id"]
        assert keep[i] and entry["on_subject"] == bool(tracks.on_subject[i])
        assert entry["query_frame"] == sources[tracks.query_frame[i]]
        for point in entry["points"]:
            assert set(point) == {"frame_index", "x", "y", "visible", "confidence"}
            f = (point["frame_index"] - 7) // 3
            assert point["visible"] == bool(tracks.visible[i, f])
            assert abs(point["x"] - tracks.positions[i, f, 0]) <= 1e-3
            assert abs(point["y"] - tracks.positions[i, f, 1]) <= 1e-3
            assert abs(point["confidence"] - tracks.confidence[i, f]) <= 1e-4
        assert sum(p["visible"] for p in entry["points"]) == tracks.lifespans()[i]
    plain = tracks_document(tracks, keep, 12.0)
    assert plain["tracks"][0]["points"][0]["frame_index"] == tracks.query_frame[keep][0]


class TruthTracker:
    """A PointTracker that knows the answer: proves track_clip uses what it is given."""

    name = "truth"

    def __init__(self, clip: OrbitClip) -> None:
        self.clip = clip
        self.calls: list[np.ndarray] = []

    def track(
        self,
        frames: Sequence[np.ndarray],
        queries: np.ndarray,
        should_stop: Callable[[], bool],
        progress: Callable[[float], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.calls.append(queries.copy())
        n = len(queries)
        seeds = Tracks(
            np.repeat(queries[:, None, 1:3], len(frames), axis=1).astype(np.float32),
            np.ones((n, len(frames)), bool),
            np.ones((n, len(frames)), np.float32),
            queries[:, 0].astype(np.int64),
            np.array([self.clip.masks[int(f)][int(y), int(x)] for f, x, y in queries]),
        )
        truth, visible, usable = tracks_truth(self.clip, seeds)
        visible &= usable[:, None]
        return truth.astype(np.float32), visible, visible.astype(np.float32) * 0.75


def test_a_custom_tracker_is_used(following: OrbitClip) -> None:
    tracker = TruthTracker(following)
    reports: list[float] = []
    tracks = track_clip(
        following.frames,
        following.masks,
        subject_points=60,
        background_points=80,
        reseed_every=16,
        tracker=tracker,
        progress=lambda fraction, message: reports.append(fraction),
    )
    assert len(tracker.calls) >= 1
    assert sum(len(q) for q in tracker.calls) == len(tracks)
    assert (tracker.calls[0][:, 0] == 0).all()
    truth = tracks_truth(following, tracks)[0]
    shown = tracks.visible
    assert shown.sum() > 1000
    assert np.abs(tracks.positions[shown] - truth[shown]).max() < 1e-3
    assert np.allclose(tracks.confidence[shown], 0.75)
    assert reports and reports[-1] == 1.0 and reports == sorted(reports)


def test_the_fb_and_appearance_checks_are_what_make_it_accurate(
    crossing: OrbitClip, crossing_tracks: Tracks
) -> None:
    # Plain LK (OpenCV's usual 21 px window, a loose 1 px FB check, no appearance check).
    plain = LucasKanadeTracker(window_size=21, fb_threshold_px=1.0, min_anchor_ncc=-1.0)
    loose = accuracy(crossing, track_clip(crossing.frames, crossing.masks, tracker=plain))
    tight = accuracy(crossing, crossing_tracks)  # the defaults, which LK is without a tracker
    assert loose["background_within_2px"] < tight["background_within_2px"] - 0.15, (loose, tight)
    assert loose["subject_within_2px"] < tight["subject_within_2px"] - 0.05, (loose, tight)


def test_seed_points_respect_mask_margin_and_exclusion(crossing: OrbitClip) -> None:
    frame, mask = crossing.frames[0], crossing.masks[0]
    inside = seed_points(frame, mask, 100, inside=True, min_distance=6)
    outside = seed_points(frame, mask, 100, inside=False, min_distance=6)
    assert len(inside) == 100 and len(outside) == 100
    for points, want in ((inside, True), (outside, False)):
        cols, rows = points[:, 0].astype(int), points[:, 1].astype(int)
        assert (mask[rows, cols] == want).all()
    exclude = outside[:50]
    more = seed_points(frame, mask, 100, inside=False, min_distance=6, exclude=exclude)
    gaps = np.linalg.norm(more[:, None] - exclude[None], axis=2)
    assert gaps.min() >= 5  # min_distance, less the pixel-grid rounding of the exclusion disc
    assert len(seed_points(frame, mask, 0, inside=True, min_distance=6)) == 0
    anywhere = seed_points(frame, None, 50, inside=True, min_distance=6)
    assert len(anywhere) == 50


def test_track_clip_without_masks_seeds_everywhere(following: OrbitClip) -> None:
    tracks = track_clip(following.frames[:10], None, subject_points=20, background_points=30)
    assert not tracks.on_subject.any()
    assert (tracks.query_frame == 0).sum() == 50


def test_cancel_before_and_during(following: OrbitClip) -> None:
    control = JobControl("job-tracks", report_progress=lambda *a: None)
    with bind(control):
        control.request_stop("cancelled")
        with pytest.raises(Cancelled):
            track_clip(following.frames, following.masks)
    control = JobControl("job-tracks-2", report_progress=lambda *a: None)
    seen: list[float] = []

    def stop_midway(fraction: float, message: str) -> None:
        seen.append(fraction)
        control.request_stop("cancelled")

    with bind(control), pytest.raises(Cancelled):
        track_clip(following.frames, following.masks, progress=stop_midway)
    assert seen and max(seen) < 0.5  # stopped within the first call, between frames
