"""A creator clip with known truth: a textured subject moving in front of a static textured
scene, filmed by a camera on a known arc. For the Orbit and VFX tests and benchmarks.

Built on tests/splat_scene.py (exact ray casting, COLMAP's conventions: world z up, camera
x right / y down / z forward, ``x_cam = R @ x_world + t``). Every frame comes with its truth:

* ``frames``: BGR uint8 images;
* ``depth``: z-depth per pixel (the mean over the pixel's 2x2 subpixels; ``inf`` for sky);
* ``masks``: the subject's pixels (bool, at least half the pixel's subpixels show it);
* ``background``: the same frame rendered without the subject (the clean plate's truth);
* ``poses``: world-to-camera (R, t); ``k``: the pinhole intrinsics.

``follow=True`` moves the subject along with the camera (a creator walking while filmed),
so its texture sits nearly still in the image: an SfM solve that sees it is pulled towards a
camera that does not move, which is what the subject mask must prevent.
``track_truth`` projects points fixed on the background or on the subject into every frame
with their visibility (in the image and not hidden by something nearer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tests.splat_scene import (
    Quad,
    _box_quads,
    intrinsics,
    look_at,
    make_scene,
    random_texture,
    render_layers,
)

__all__ = ["OrbitClip", "orbit_clip", "sample_surface_points", "track_truth"]


@dataclass
class OrbitClip:
    frames: list[np.ndarray]
    depth: list[np.ndarray]
    masks: list[np.ndarray]
    background: list[np.ndarray]
    poses: list[tuple[np.ndarray, np.ndarray]]
    k: np.ndarray
    width: int
    height: int
    fps: float
    background_quads: list[Quad]
    subject_quads: list[Quad]
    subject_offsets: list[np.ndarray]
    """World translation of the subject in each frame (from its frame-0 placement)."""
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    @property
    def path_length(self) -> float:
        return float(np.linalg.norm(np.diff(self.centres, axis=0), axis=1).sum())

    def quads_at(self, frame: int) -> list[Quad]:
        offset = self.subject_offsets[frame]
        moved = [Quad(q.origin + offset, q.u, q.v, q.texture, q.shade) for q in self.subject_quads]
        return self.background_quads + moved


def _camera_path(n: int, arc_deg: float, radius: float) -> list[tuple[np.ndarray, np.ndarray]]:
    poses = []
    target = np.array([0.0, 0.0, 0.7])
    for i in range(n):
        s = i / max(1, n - 1)
        angle = np.deg2rad(-arc_deg / 2 + arc_deg * s)
        centre = np.array(
            [radius * np.cos(angle), radius * np.sin(angle), 1.5 + 0.25 * np.sin(2 * np.pi * s)]
        )
        poses.append(look_at(centre, target))
    return poses


def orbit_clip(
    n_frames: int = 48,
    *,
    width: int = 320,
    height: int = 240,
    focal: float = 260.0,
    arc_deg: float = 40.0,
    radius: float = 4.6,
    follow: bool = True,
    subject_size: tuple[float, float, float] = (0.7, 0.7, 1.5),
    fps: float = 12.0,
    seed: int = 0,
    with_background: bool = True,
) -> OrbitClip:
    """Render the clip (and, with ``with_background``, each frame again without the subject)."""
    scene = make_scene(seed)
    rng = np.random.default_rng(seed + 101)
    k = intrinsics(width, height, focal)
    poses = _camera_path(n_frames, arc_deg, radius)
    centres = np.array([-rot.T @ t for rot, t in poses])
    # The subject stands ~40 % of the way from the camera to the scene centre at frame 0.
    start = centres[0, :2] * 0.55
    # Finer texture than the scene's (the subject is near): many SIFT features on it.
    subject = [
        Quad(
            q.origin, q.u, q.v, random_texture(rng, *(3 * n for n in q.texture.shape[:2])), q.shade
        )
        for q in _box_quads(rng, (float(start[0]), float(start[1])), subject_size)
    ]
    offsets = []
    for i in range(n_frames):
        if follow:  # walks with the camera, a little slower, and sways sideways
            along = (centres[i, :2] - centres[0, :2]) * 0.55
        else:  # crosses the frame on its own
            along = np.array([0.0, 0.6 * (i / max(1, n_frames - 1)) - 0.3])
        sway = 0.08 * np.sin(2 * np.pi * i / 24.0)
        offsets.append(np.array([along[0], along[1] + sway, 0.0]))
    clip = OrbitClip(
        frames=[], depth=[], masks=[], background=[], poses=poses, k=k, width=width,
        height=height, fps=fps, background_quads=list(scene.quads), subject_quads=subject,
        subject_offsets=offsets, centres=centres,
    )  # fmt: skip
    n_background = len(clip.background_quads)
    for i, (rot, t) in enumerate(poses):
        colour, depth, index = render_layers(clip.quads_at(i), k, rot, t, width, height)
        clip.frames.append(colour)
        sub = depth.reshape(height, 2, width, 2)
        with np.errstate(invalid="ignore"):
            clip.depth.append(sub.mean(axis=(1, 3)))
        clip.masks.append(
            (index >= n_background).reshape(height, 2, width, 2).mean(axis=(1, 3)) >= 0.5
        )
        if with_background:
            clip.background.append(
                render_layers(clip.background_quads, k, rot, t, width, height)[0]
            )
    return clip


def sample_surface_points(
    quads: list[Quad], count: int, rng: np.random.Generator, margin: float = 0.04
) -> np.ndarray:
    """Points on the quads, spread by area (world coordinates), away from their edges."""
    areas = np.array([np.linalg.norm(np.cross(q.u, q.v)) for q in quads])
    choice = rng.choice(len(quads), size=count, p=areas / areas.sum())
    ab = rng.uniform(margin, 1 - margin, size=(count, 2))
    return np.array(
        [
            quads[c].origin + a * quads[c].u + b * quads[c].v
            for c, (a, b) in zip(choice, ab, strict=True)
        ]
    )


def track_truth(
    clip: OrbitClip, points: np.ndarray, on_subject: bool, edge_px: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(positions [n, frames, 2] in pixels, visible [n, frames]) of world points at frame 0
    (a subject's points move with it). Visible: inside the image by ``edge_px`` and the
    rendered depth at the pixel within 2 % of the point's own depth (nothing in front)."""
    n, frames = len(points), len(clip.frames)
    positions = np.zeros((n, frames, 2))
    visible = np.zeros((n, frames), bool)
    for f, (rot, t) in enumerate(clip.poses):
        world = points + (clip.subject_offsets[f] - clip.subject_offsets[0] if on_subject else 0)
        cam = world @ rot.T + t
        uvw = cam @ clip.k.T
        uv = uvw[:, :2] / uvw[:, 2:3]
        positions[:, f] = uv
        inside = (
            (cam[:, 2] > 1e-3)
            & (uv[:, 0] >= edge_px)
            & (uv[:, 0] <= clip.width - edge_px)
            & (uv[:, 1] >= edge_px)
            & (uv[:, 1] <= clip.height - edge_px)
        )
        cols = np.clip(uv[:, 0].astype(int), 0, clip.width - 1)
        rows = np.clip(uv[:, 1].astype(int), 0, clip.height - 1)
        seen = clip.depth[f][rows, cols]
        with np.errstate(invalid="ignore"):
            unhidden = np.abs(seen - cam[:, 2]) <= 0.02 * cam[:, 2]
        visible[:, f] = inside & unhidden
    return positions, visible
