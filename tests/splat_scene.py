"""A synthetic scene with known cameras, for Structure-from-Motion tests and benchmarks.

Textured boxes on a textured ground plane, rendered by an exact pinhole ray caster written
here with numpy (no rasteriser approximations): every pixel's ray is intersected
analytically with every textured rectangle and the nearest hit is shaded from its texture.
Conventions are COLMAP's, so recovered poses compare directly with the truth:

* world: right-handed, z up, the scene centred on the origin;
* camera: OpenCV axes (x right, y down, z forward); ``x_cam = R @ x_world + t``;
* pixels: the centre of pixel (col, row) is the image point (col + 0.5, row + 0.5), so the
  principal point of a W x H image is (W/2, H/2) exactly, as COLMAP assumes.

The textures are multi-scale coloured noise plus random discs and rectangles, all random
(nothing repeats), so SIFT finds many distinctive features. Rendering supersamples 2x2 and
box-filters down, which keeps edges anti-aliased without moving them.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "Quad",
    "Scene",
    "encode_mp4",
    "look_at",
    "make_scene",
    "pan_views",
    "pose_errors",
    "render",
    "render_layers",
    "render_views",
    "umeyama",
]


@dataclass(frozen=True)
class Quad:
    """A textured rectangle: points ``origin + a * u + b * v`` for a, b in [0, 1].

    ``u`` and ``v`` must be orthogonal; texture column ~ a, row ~ b.
    """

    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray
    texture: np.ndarray  # BGR uint8
    shade: float = 1.0  # a fixed per-face brightness (view-independent, so SfM-consistent)


@dataclass(frozen=True)
class Scene:
    quads: list[Quad]
    radius: float  # the horizontal orbit radius the default views use
    height: float  # camera height of the default views
    target: np.ndarray  # where the default views look


def random_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Rich, non-repeating colour texture: noise at several scales + random shapes."""
    tex = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 0.5), (16, 0.35), (48, 0.25)):
        small = rng.random((max(2, height * cells // width), cells, 3)).astype(np.float32)
        tex += weight * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    tex = np.clip(tex / 1.1 * 255.0, 0, 255).astype(np.uint8)
    area = height * width
    # Discs and rectangles of many sizes give SIFT corners and blobs at several octaves.
    for _ in range(area // 900):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(3, max(4, min(height, width) // 12)))
        if rng.random() < 0.5:
            cv2.circle(tex, (x, y), size, colour, -1, lineType=cv2.LINE_AA)
        else:
            w2, h2 = size, int(rng.integers(2, size + 2))
            cv2.rectangle(tex, (x - w2, y - h2), (x + w2, y + h2), colour, -1)
    return cv2.GaussianBlur(tex, (0, 0), 0.7)


def _box_quads(
    rng: np.random.Generator, centre: tuple[float, float], size: tuple[float, float, float]
) -> list[Quad]:
    """The five visible faces (not the bottom) of an axis-aligned box standing on z = 0."""
    cx, cy = centre
    sx, sy, sz = size
    x0, y0, x1, y1 = cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2
    ex, ey, ez = np.array([sx, 0, 0.0]), np.array([0, sy, 0.0]), np.array([0, 0, sz])
    px = 96  # texels per unit length: ~2x the finest sampling rate of the default views

    def tex(a: float, b: float) -> np.ndarray:
        return random_texture(rng, max(16, int(b * px)), max(16, int(a * px)))

    return [
        Quad(np.array([x0, y0, sz]), ex, ey, tex(sx, sy), 1.0),  # top
        Quad(np.array([x0, y0, 0.0]), ex, ez, tex(sx, sz), 0.8),  # -y face
        Quad(np.array([x0, y1, 0.0]), ex, ez, tex(sx, sz), 0.7),  # +y face
        Quad(np.array([x0, y0, 0.0]), ey, ez, tex(sy, sz), 0.85),  # -x face
        Quad(np.array([x1, y0, 0.0]), ey, ez, tex(sy, sz), 0.75),  # +x face
    ]


def make_scene(seed: int = 0) -> Scene:
    """Three boxes of different sizes on a 12 x 12 textured ground, orbit radius 5."""
    rng = np.random.default_rng(seed)
    half = 6.0
    ground = Quad(
        np.array([-half, -half, 0.0]),
        np.array([2 * half, 0, 0.0]),
        np.array([0, 2 * half, 0.0]),
        random_texture(rng, 1536, 1536),
    )
    quads = [ground]
    quads += _box_quads(rng, (0.0, 0.0), (1.6, 1.2, 1.4))
    quads += _box_quads(rng, (1.6, 1.3), (0.8, 0.9, 0.7))
    quads += _box_quads(rng, (-1.5, 1.0), (0.7, 1.1, 1.0))
    quads += _box_quads(rng, (0.6, -1.7), (1.0, 0.6, 0.5))
    return Scene(quads=quads, radius=5.0, height=2.5, target=np.array([0.0, 0.0, 0.4]))


def look_at(centre: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R, t) of a camera at ``centre`` looking at ``target``, z up."""
    forward = target - centre
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    return rot, -rot @ centre


def intrinsics(width: int = 320, height: int = 240, focal: float = 280.0) -> np.ndarray:
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]])


def render(
    scene: Scene, k: np.ndarray, rot: np.ndarray, t: np.ndarray, width: int, height: int
) -> np.ndarray:
    """BGR uint8 image of the scene seen by the camera (k, rot, t), 2x2 supersampled."""
    return render_layers(scene.quads, k, rot, t, width, height)[0]


def render_layers(
    quads: list[Quad], k: np.ndarray, rot: np.ndarray, t: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(BGR uint8 image, z-depth per subpixel, index of the quad each subpixel shows, -1 for
    sky) for the camera (k, rot, t); depth and index are at the 2x2 supersampled size
    (``[2 * height, 2 * width]``), so a caller can tell a pixel's coverage exactly."""
    ss = 2
    # Render at ss x resolution: pixel centres there are at (j + 0.5) / ss in the original.
    k_ss = k.copy()
    k_ss[:2] *= ss
    w, h = width * ss, height * ss
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    pix = np.stack([cols, rows, np.ones_like(cols)], axis=-1)
    dirs = (pix @ np.linalg.inv(k_ss).T) @ rot  # [h, w, 3] camera rays in world: R^T d
    origin = -rot.T @ t

    depth = np.full((h, w), np.inf)
    index = np.full((h, w), -1, np.int32)
    # Sky: a smooth, featureless gradient with elevation.
    elev = dirs[..., 2] / np.linalg.norm(dirs, axis=-1)
    colour = np.stack([235 - 40 * elev, 205 - 30 * elev, 170 - 20 * elev], axis=-1)

    for number, quad in enumerate(quads):
        # Only rays inside the quad's projected bounding box can hit it (when it lies wholly
        # in front of the camera); this is a speed-up, the hit test below stays exact.
        corners = quad.origin + np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) @ np.stack(
            [quad.u, quad.v]
        )
        cam = corners @ rot.T + t
        r0, r1, c0, c1 = 0, h, 0, w
        if (cam[:, 2] > 1e-6).all():
            uv = (cam @ k_ss.T)[:, :2] / cam[:, 2:3]
            c0, r0 = (max(0, int(np.floor(x)) - 1) for x in uv.min(axis=0))
            c1 = min(w, int(np.ceil(uv[:, 0].max())) + 1)
            r1 = min(h, int(np.ceil(uv[:, 1].max())) + 1)
            if c0 >= c1 or r0 >= r1:
                continue
        d = dirs[r0:r1, c0:c1].reshape(-1, 3)
        normal = np.cross(quad.u, quad.v)
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = ((quad.origin - origin) @ normal) / (d @ normal)
        sub_depth = depth[r0:r1, c0:c1].reshape(-1)
        hit = np.isfinite(dist) & (dist > 1e-6) & (dist < sub_depth)
        idx = np.nonzero(hit)[0]
        if idx.size == 0:
            continue
        points = origin - quad.origin + dist[idx, None] * d[idx]
        a = points @ quad.u / (quad.u @ quad.u)
        b = points @ quad.v / (quad.v @ quad.v)
        inside = (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)
        idx, a, b = idx[inside], a[inside], b[inside]
        if idx.size == 0:
            continue
        th, tw = quad.texture.shape[:2]
        # cv2.remap wants maps under 32767 rows: lay the samples out 1024 to a row.
        n, row = idx.size, 1024
        pad = -n % row
        map_x = np.pad(a * tw - 0.5, (0, pad)).astype(np.float32).reshape(-1, row)
        map_y = np.pad(b * th - 0.5, (0, pad)).astype(np.float32).reshape(-1, row)
        texels = cv2.remap(
            quad.texture, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        ).reshape(-1, 3)[:n]
        sub_depth[idx] = dist[idx]
        sub_colour = colour[r0:r1, c0:c1].reshape(-1, 3)
        sub_colour[idx] = texels * quad.shade
        depth[r0:r1, c0:c1] = sub_depth.reshape(r1 - r0, c1 - c0)
        colour[r0:r1, c0:c1] = sub_colour.reshape(r1 - r0, c1 - c0, 3)
        sub_index = index[r0:r1, c0:c1].reshape(-1)
        sub_index[idx] = number
        index[r0:r1, c0:c1] = sub_index.reshape(r1 - r0, c1 - c0)

    big = np.clip(colour, 0, 255)
    # A 2x2 box filter: each output pixel averages exactly its own four subpixels.
    small = big.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    # dist is along R^T K^-1 (u, v, 1), whose camera z is 1: it is the z-depth itself.
    return np.clip(np.rint(small), 0, 255).astype(np.uint8), depth, index


def orbit_poses(
    scene: Scene, n_views: int, arc_deg: float = 360.0, start_deg: float = 0.0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """World-to-camera poses on a circle (or an arc) around the scene, looking at the target.

    The height bobs a little so the cameras are not coplanar, which a similarity alignment
    handles either way but which makes the test stricter on the vertical axis.
    """
    poses = []
    for i in range(n_views):
        step = arc_deg / (n_views if arc_deg >= 360 else max(1, n_views - 1))
        angle = np.deg2rad(start_deg + i * step)
        z = scene.height + 0.4 * np.sin(3 * angle)
        centre = np.array([scene.radius * np.cos(angle), scene.radius * np.sin(angle), z])
        poses.append(look_at(centre, scene.target))
    return poses


def render_views(
    n_views: int = 32,
    *,
    width: int = 320,
    height: int = 240,
    focal: float = 280.0,
    seed: int = 0,
    arc_deg: float = 360.0,
) -> tuple[list[np.ndarray], np.ndarray, list[tuple[np.ndarray, np.ndarray]], Scene]:
    """Images (BGR), K, world-to-camera poses (R, t) and the scene, for n views on an orbit."""
    scene = make_scene(seed)
    k = intrinsics(width, height, focal)
    poses = orbit_poses(scene, n_views, arc_deg)
    images = [render(scene, k, rot, t, width, height) for rot, t in poses]
    return images, k, poses, scene


def encode_mp4(frames: list[np.ndarray], path: str | Path, fps: float, crf: int = 10) -> Path:
    """H.264 mp4 of BGR frames via PyAV (libx264, yuv420p). ``crf`` 10 is visually
    lossless, so SfM sees (nearly) what was rendered."""
    import av

    path = Path(path)
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (scale, R, t) minimising ||dst - (scale * R @ src + t)||² (Umeyama 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    fix = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection is not a rotation
        fix[2, 2] = -1
    rot = u @ fix @ vt
    scale = float(np.trace(np.diag(sig) @ fix) / ((s**2).sum() / len(src)))
    return scale, rot, mu_d - scale * rot @ mu_s


def pose_errors(
    est_rot: list[np.ndarray],
    est_centres: np.ndarray,
    true_rot: list[np.ndarray],
    true_centres: np.ndarray,
) -> dict[str, float]:
    """Camera-centre RMS error (world units of the truth) after aligning the estimate to the
    truth with a similarity, and the RMS / max rotation error in degrees after the same
    alignment. Rotations are world-to-camera: aligned R_est' = R_est @ R_align^T."""
    scale, rot, trans = umeyama(est_centres, true_centres)
    aligned = (scale * (rot @ np.asarray(est_centres).T)).T + trans
    centre_err = np.linalg.norm(aligned - true_centres, axis=1)
    angles = []
    for r_est, r_true in zip(est_rot, true_rot, strict=True):
        delta = (r_est @ rot.T) @ r_true.T
        angles.append(np.degrees(np.arccos(np.clip((np.trace(delta) - 1) / 2, -1.0, 1.0))))
    return {
        "centre_rms": float(np.sqrt((centre_err**2).mean())),
        "centre_max": float(centre_err.max()),
        "rotation_rms_deg": float(np.sqrt(np.mean(np.square(angles)))),
        "rotation_max_deg": float(np.max(angles)),
        "scale": scale,
    }


def pan_views(
    n_views: int = 12, *, width: int = 320, height: int = 240, seed: int = 0
) -> list[np.ndarray]:
    """A camera that only turns in place (a tripod pan over 40 degrees): no parallax."""
    scene = make_scene(seed)
    k = intrinsics(width, height, 0.875 * width)
    centre = np.array([scene.radius, 0.0, scene.height])
    views = []
    for angle in np.deg2rad(np.linspace(-20, 20, n_views)):
        target = centre + np.array([-np.cos(angle), np.sin(angle), -0.45])
        views.append(render(scene, k, *look_at(centre, target), width, height))
    return views
