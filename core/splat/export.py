"""Writers and readers for trained Gaussian splats (pure functions on numpy arrays).

Formats:

* ``write_ply``: the standard 3DGS PLY of the INRIA code, read by SuperSplat, antimatter15,
  the INRIA viewer and most others: binary little-endian float32 vertex properties
  ``x y z nx ny nz f_dc_0..2 f_rest_0..M-1 opacity scale_0..2 rot_0..3``; opacity is the
  logit, scales are logs, rot is the wxyz quaternion, f_rest is channel-major (all R
  coefficients, then G, then B).
* ``write_rgb_ply``: a plain coloured point cloud (``x y z red green blue``).
* ``write_splat``: antimatter15's ``.splat``: 32 bytes per Gaussian, no header, sorted by
  decreasing ``exp(sum log-scales) * sigmoid(opacity)`` like antimatter15's ``convert.py``.
* ``write_compressed_ply``: PlayCanvas/SuperSplat ``.compressed.ply`` (chunks of 256
  Gaussians with quantised position/rotation/scale/colour and 8-bit SH), byte-compatible
  with gsplat's ``export_splats(format="ply_compressed")``.
* ``to_transforms_json`` / ``to_cameras_json``: the camera files splat trainers read
  (nerfstudio ``transforms.json``, INRIA ``cameras.json``) from an SfM result.

The world frame is the SfM result's (``core.splat.sfm.run_sfm``'s ``orient``: by default
+Z up, the camera centroid at the origin). Every PLY writer takes ``comments``; pass
``frame_comments(result)`` so the file says which axis is up and how it was framed
(``comment up 0 0 1``, ``comment applied_transform <12 numbers, row-major 3x4>``).

Arrays follow gsplat's parameter layout: ``means [N,3]``, ``scales_log [N,3]``,
``quats [N,4]`` (wxyz), ``opacity_logit [N]``, ``sh_dc [N,3]`` (or ``[N,1,3]``) and
``sh_rest [N,K-1,3]`` (coefficient-major, gsplat's ``shN``; ``None`` for degree 0).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from plyfile import PlyData, PlyElement

if TYPE_CHECKING:  # annotations only: sfm's types are not needed at run time
    from core.splat.sfm import CameraIntrinsics, SfmResult

__all__ = [
    "CV_TO_GL",
    "SH_C0",
    "camera_to_world_from_transforms",
    "decode_splat",
    "encode_splat",
    "frame_comments",
    "read_ply",
    "to_cameras_json",
    "to_transforms_json",
    "write_compressed_ply",
    "write_ply",
    "write_rgb_ply",
    "write_splat",
]

SH_C0 = 0.28209479177387814  # Y_0^0: rgb = 0.5 + SH_C0 * f_dc
SPLAT_DTYPE = np.dtype(
    [("pos", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)]
)
_PathLike = str | os.PathLike[str]


def frame_comments(result: SfmResult) -> list[str]:
    """PLY header comments naming the scene's frame: the orient setting, the up direction
    and the applied transform (COLMAP world to this one), for viewers and people alike."""
    comments = [f"orient {result.orient}"]
    if result.up is not None:
        comments.append("up " + " ".join(f"{v:.6g}" for v in result.up))
    matrix = np.asarray(result.applied_transform, np.float64).reshape(-1)[:12]
    comments.append("applied_transform " + " ".join(f"{v:.9g}" for v in matrix))
    return comments


def _as_f32(name: str, x: Any, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a


def _gaussians(
    means: Any,
    scales_log: Any,
    quats: Any,
    opacity_logit: Any,
    sh_dc: Any,
    sh_rest: Any = None,
) -> tuple[np.ndarray, ...]:
    """Validate and normalise shapes: returns means, scales, quats, opacity [N], dc [N,3],
    rest [N, K-1, 3]; raises on NaN / inf, which viewers cannot display."""
    means = np.asarray(means, dtype=np.float32)
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"means must be [N, 3], got {means.shape}")
    n = means.shape[0]
    scales = _as_f32("scales_log", scales_log, (n, 3))
    q = _as_f32("quats", quats, (n, 4))
    op = np.asarray(opacity_logit, dtype=np.float32).reshape(-1)
    if op.shape != (n,):
        raise ValueError(f"opacity_logit must be [N] or [N,1], got {np.shape(opacity_logit)}")
    dc = np.asarray(sh_dc, dtype=np.float32).reshape(n, -1)
    if dc.shape != (n, 3):
        raise ValueError(f"sh_dc must be [N,3] or [N,1,3], got {np.shape(sh_dc)}")
    if sh_rest is None:
        rest = np.zeros((n, 0, 3), dtype=np.float32)
    else:
        rest = np.asarray(sh_rest, dtype=np.float32)
        if rest.ndim != 3 or rest.shape[0] != n or rest.shape[2] != 3:
            raise ValueError(f"sh_rest must be [N, K-1, 3], got {rest.shape}")
        if math.isqrt(rest.shape[1] + 1) ** 2 != rest.shape[1] + 1:
            raise ValueError(f"sh_rest has {rest.shape[1]} coefficients; K must be a square")
    for name, a in (("means", means), ("scales", scales), ("quats", q), ("opacity", op)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    if not (np.isfinite(dc).all() and np.isfinite(rest).all()):
        raise ValueError("SH coefficients contain NaN or inf")
    return means, scales, q, op, dc, rest


def _write_vertices(
    path: _PathLike, fields: list[tuple[str, np.ndarray]], dtype: str, comments: Sequence[str]
) -> None:
    n = fields[0][1].shape[0]
    arr = np.empty(n, dtype=[(name, dtype) for name, _ in fields])
    for name, values in fields:
        arr[name] = values
    PlyData(
        [PlyElement.describe(arr, "vertex")], text=False, byte_order="<", comments=list(comments)
    ).write(str(path))


def write_ply(
    path: _PathLike,
    means: Any,
    scales_log: Any,
    quats: Any,
    opacity_logit: Any,
    sh_dc: Any,
    sh_rest: Any = None,
    *,
    comments: Sequence[str] = (),
) -> None:
    """Write the standard (INRIA) 3DGS PLY. Raw parameters: log scales, opacity logits,
    unnormalised quaternions are stored as given (viewers normalise)."""
    means, scales, q, op, dc, rest = _gaussians(
        means, scales_log, quats, opacity_logit, sh_dc, sh_rest
    )
    n = means.shape[0]
    # INRIA: features_rest [N, K-1, 3] -> transpose(1, 2) -> flatten: channel-major.
    rest_cm = rest.transpose(0, 2, 1).reshape(n, -1)
    fields: list[tuple[str, np.ndarray]] = [
        ("x", means[:, 0]),
        ("y", means[:, 1]),
        ("z", means[:, 2]),
        ("nx", np.zeros(n, np.float32)),
        ("ny", np.zeros(n, np.float32)),
        ("nz", np.zeros(n, np.float32)),
    ]
    fields += [(f"f_dc_{i}", dc[:, i]) for i in range(3)]
    fields += [(f"f_rest_{i}", rest_cm[:, i]) for i in range(rest_cm.shape[1])]
    fields.append(("opacity", op))
    fields += [(f"scale_{i}", scales[:, i]) for i in range(3)]
    fields += [(f"rot_{i}", q[:, i]) for i in range(4)]
    _write_vertices(path, fields, "<f4", comments)


def write_rgb_ply(
    path: _PathLike, means: Any, rgb_uint8: Any, *, comments: Sequence[str] = ()
) -> None:
    """Write a coloured point cloud: float32 ``x y z`` and uchar ``red green blue``."""
    means = np.asarray(means, dtype=np.float32)
    if means.ndim != 2 or means.shape[1] != 3:
        raise ValueError(f"means must be [N, 3], got {means.shape}")
    rgb = np.asarray(rgb_uint8)
    if rgb.shape != means.shape:
        raise ValueError(f"rgb must be [N, 3] like means, got {rgb.shape}")
    if not np.issubdtype(rgb.dtype, np.integer):
        raise TypeError(f"rgb must be integers in 0..255, got dtype {rgb.dtype}")
    if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
        raise ValueError("rgb values must be in 0..255")
    rgb = rgb.astype(np.uint8)
    n = means.shape[0]
    arr = np.empty(
        n,
        dtype=[
            ("x", "<f4"),
            ("y", "<f4"),
            ("z", "<f4"),
            ("red", "u1"),
            ("green", "u1"),
            ("blue", "u1"),
        ],
    )
    for i, name in enumerate(("x", "y", "z")):
        arr[name] = means[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        arr[name] = rgb[:, i]
    PlyData(
        [PlyElement.describe(arr, "vertex")], text=False, byte_order="<", comments=list(comments)
    ).write(str(path))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def encode_splat(means: Any, scales_log: Any, quats: Any, opacity_logit: Any, sh_dc: Any) -> bytes:
    """antimatter15 ``.splat`` bytes (see :func:`write_splat`)."""
    means, scales, q, op, dc, _ = _gaussians(means, scales_log, quats, opacity_logit, sh_dc)
    n = means.shape[0]
    # Same importance order and quantisation (truncating uint8 casts) as convert.py.
    with np.errstate(over="ignore"):
        importance = np.exp(scales.sum(axis=1)) / (1.0 + np.exp(-op))
    order = np.argsort(-importance, kind="stable")
    rec = np.empty(n, dtype=SPLAT_DTYPE)
    rec["pos"] = means
    rec["scale"] = np.exp(scales)
    rgba = np.concatenate([0.5 + SH_C0 * dc.astype(np.float64), _sigmoid(op)[:, None]], axis=1)
    rec["rgba"] = np.clip(rgba * 255.0, 0, 255).astype(np.uint8)
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    # A zero quaternion cannot be normalised: store the identity rotation instead.
    qn = np.where(norm > 0, q / np.where(norm > 0, norm, 1.0), np.array([1, 0, 0, 0], np.float32))
    rec["rot"] = np.clip(qn * 128.0 + 128.0, 0, 255).astype(np.uint8)
    return rec[order].tobytes()


def write_splat(
    path: _PathLike, means: Any, scales_log: Any, quats: Any, opacity_logit: Any, sh_dc: Any
) -> None:
    """Write antimatter15 ``.splat``: per Gaussian 3 float32 position, 3 float32 scale
    (exp'd), RGBA uint8 (``0.5 + C0 * dc`` and ``sigmoid(opacity)``, x255, clamped,
    truncated), 4 uint8 rotation (normalised wxyz ``* 128 + 128``); view-independent colour
    only (higher SH bands are dropped by the format)."""
    data = encode_splat(means, scales_log, quats, opacity_logit, sh_dc)
    with open(path, "wb") as f:
        f.write(data)


def decode_splat(data: bytes) -> dict[str, np.ndarray]:
    """Decode ``.splat`` bytes as viewers do: means, scales (linear), rgba (uint8),
    colors (float 0..1), opacities (0..1) and quats (``(byte - 128) / 128``)."""
    if len(data) % SPLAT_DTYPE.itemsize:
        raise ValueError(f".splat size {len(data)} is not a multiple of 32")
    rec = np.frombuffer(data, dtype=SPLAT_DTYPE)
    return {
        "means": rec["pos"].copy(),
        "scales": rec["scale"].copy(),
        "rgba": rec["rgba"].copy(),
        "colors": rec["rgba"][:, :3] / 255.0,
        "opacities": rec["rgba"][:, 3] / 255.0,
        "quats": (rec["rot"].astype(np.float32) - 128.0) / 128.0,
    }


def read_ply(path: _PathLike) -> dict[str, np.ndarray]:
    """Read a PLY written by this module (or another 3DGS / point cloud PLY).

    Returns ``property_names`` (vertex properties in file order) and, where present,
    ``means`` [N,3]; ``normals``; ``sh_dc`` [N,3], ``sh_rest`` [N,K-1,3] (coefficient-major,
    as given to :func:`write_ply`), ``opacity_logit`` [N], ``scales_log`` [N,3], ``quats``
    [N,4]; ``rgb`` [N,3] uint8. A compressed PLY (``chunk`` element) is returned raw as
    ``<element>.<property>`` arrays.
    """
    ply = PlyData.read(str(path))
    elements = {el.name: el for el in ply.elements}
    out: dict[str, np.ndarray] = {"comments": np.array(ply.comments, dtype=str)}
    if "chunk" in elements:
        for el in ply.elements:
            for p in el.properties:
                out[f"{el.name}.{p.name}"] = np.asarray(el.data[p.name])
        return out
    v = elements["vertex"].data
    names = list(v.dtype.names or ())
    out["property_names"] = np.array(names)

    def stack(keys: list[str], dtype: Any = np.float32) -> np.ndarray:
        return np.stack([np.asarray(v[k], dtype=dtype) for k in keys], axis=1)

    if {"x", "y", "z"} <= set(names):
        out["means"] = stack(["x", "y", "z"])
    if {"nx", "ny", "nz"} <= set(names):
        out["normals"] = stack(["nx", "ny", "nz"])
    if "f_dc_0" in names:
        out["sh_dc"] = stack([f"f_dc_{i}" for i in range(3)])
        rest = [n for n in names if n.startswith("f_rest_")]
        rest.sort(key=lambda s: int(s.rsplit("_", 1)[1]))
        n = len(v)
        cm = stack(rest) if rest else np.zeros((n, 0), np.float32)
        out["sh_rest"] = cm.reshape(n, 3, -1).transpose(0, 2, 1).copy()
    if "opacity" in names:
        out["opacity_logit"] = np.asarray(v["opacity"], dtype=np.float32)
    if "scale_0" in names:
        out["scales_log"] = stack([f"scale_{i}" for i in range(3)])
    if "rot_0" in names:
        out["quats"] = stack([f"rot_{i}" for i in range(4)])
    if "red" in names:
        out["rgb"] = stack(["red", "green", "blue"], np.uint8)
    return out


# --------------------------------------------------------------------- compressed PLY


def _sigmoid_f32(x: np.ndarray) -> np.ndarray:
    # float32 like gsplat's exporter so 8-bit quantisation rounds identically
    return np.float32(1) / (np.float32(1) + np.exp(-x.astype(np.float32)))


def _unorm(x: np.ndarray, bits: int) -> np.ndarray:
    t = (1 << bits) - 1
    return np.clip(np.floor(x * t + 0.5), 0, t).astype(np.int64)


def _normalise(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    rng = hi - lo
    # A constant column (e.g. one Gaussian in the chunk) quantises to 0 instead of NaN.
    return np.where(rng > 0, (x - lo) / np.where(rng > 0, rng, 1), 0.0)


def _morton_order(means: np.ndarray) -> np.ndarray:
    """Order by 30-bit Morton code of 10-bit quantised positions (as gsplat's exporter)."""
    lo, hi = means.min(axis=0), means.max(axis=0)
    length = np.where(hi - lo == 0, 1, hi - lo)
    q = np.floor((means - lo) / length * 1024).astype(np.int64)

    def part1by2(x: np.ndarray) -> np.ndarray:
        x = x & 0x3FF
        x = (x ^ (x << 16)) & 0xFF0000FF
        x = (x ^ (x << 8)) & 0x0300F00F
        x = (x ^ (x << 4)) & 0x030C30C3
        return (x ^ (x << 2)) & 0x09249249

    code = (part1by2(q[:, 2]) << 2) + (part1by2(q[:, 1]) << 1) + part1by2(q[:, 0])
    return np.argsort(code, kind="stable")


def _pack_rotation(q: np.ndarray) -> np.ndarray:
    """Smallest-three quaternion packing: 2 bits index of the largest |component|, then the
    other three (sign-flipped so the largest is positive) at 10 bits each."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    largest = np.argmax(np.abs(q), axis=1)
    rows = np.arange(len(q))
    q = np.where((q[rows, largest] < 0)[:, None], -q, q)
    others = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])[largest]
    packed = _unorm(q[rows[:, None], others] * (math.sqrt(2) * 0.5) + 0.5, 10)
    return (
        (largest.astype(np.int64) << 30)
        | (packed[:, 0] << 20)
        | (packed[:, 1] << 10)
        | packed[:, 2]
    )


def write_compressed_ply(
    path: _PathLike,
    means: Any,
    scales_log: Any,
    quats: Any,
    opacity_logit: Any,
    sh_dc: Any,
    sh_rest: Any = None,
    *,
    chunk_size: int = 256,
    min_opacity: float = 1.0 / 255.0,
    comments: Sequence[str] = (),
) -> int:
    """Write the PlayCanvas / SuperSplat compressed PLY (about 16 bytes per Gaussian plus
    one byte per higher-order SH coefficient). Gaussians with ``sigmoid(opacity) <=
    min_opacity`` are dropped (as gsplat does); returns the number written."""
    means, scales, q, op, dc, rest = _gaussians(
        means, scales_log, quats, opacity_logit, sh_dc, sh_rest
    )
    keep = _sigmoid_f32(op) > min_opacity
    means, scales, q, op, dc, rest = (a[keep] for a in (means, scales, q, op, dc, rest))
    n = means.shape[0]
    order = _morton_order(means) if n else np.zeros(0, np.int64)
    colors = dc * np.float32(SH_C0) + np.float32(0.5)
    rest_cm = rest.transpose(0, 2, 1).reshape(n, -1)  # channel-major like f_rest
    n_chunks = -(-n // chunk_size)

    chunk_rows = np.empty((n_chunks, 18), dtype="<f4")
    packed = np.empty((n, 4), dtype=np.int64)
    for c in range(n_chunks):
        idx = order[c * chunk_size : (c + 1) * chunk_size]
        sl = slice(c * chunk_size, c * chunk_size + len(idx))
        m, s, col = means[idx], scales[idx], colors[idx]
        m_lo, m_hi = m.min(axis=0), m.max(axis=0)
        s_lo, s_hi = np.clip(s.min(axis=0), -20, 20), np.clip(s.max(axis=0), -20, 20)
        c_lo, c_hi = col.min(axis=0), col.max(axis=0)
        chunk_rows[c] = np.concatenate([m_lo, m_hi, s_lo, s_hi, c_lo, c_hi])
        mn = _normalise(m, m_lo, m_hi)
        sn = _normalise(s, s_lo, s_hi)
        cn = _normalise(col, c_lo, c_hi)

        def p111011(v: np.ndarray) -> np.ndarray:
            return (_unorm(v[:, 0], 11) << 21) | (_unorm(v[:, 1], 10) << 11) | _unorm(v[:, 2], 11)

        rgba = np.concatenate([cn, _sigmoid_f32(op[idx])[:, None]], axis=1)
        packed[sl, 0] = p111011(mn)
        packed[sl, 1] = _pack_rotation(q[idx])
        packed[sl, 2] = p111011(sn)
        packed[sl, 3] = (
            (_unorm(rgba[:, 0], 8) << 24)
            | (_unorm(rgba[:, 1], 8) << 16)
            | (_unorm(rgba[:, 2], 8) << 8)
            | _unorm(rgba[:, 3], 8)
        )
    sh_q = np.clip(np.trunc((rest_cm[order] / 8 + 0.5) * 256), 0, 255).astype(np.uint8)

    names = ["min_x", "min_y", "min_z", "max_x", "max_y", "max_z"]
    names += ["min_scale_x", "min_scale_y", "min_scale_z", "max_scale_x", "max_scale_y"]
    names += ["max_scale_z", "min_r", "min_g", "min_b", "max_r", "max_g", "max_b"]
    header = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments)]
    header.append(f"element chunk {n_chunks}")
    header += [f"property float {p}" for p in names]
    header.append(f"element vertex {n}")
    header += [
        f"property uint {p}"
        for p in ("packed_position", "packed_rotation", "packed_scale", "packed_color")
    ]
    if rest_cm.shape[1]:
        header.append(f"element sh {n}")
        header += [f"property uchar f_rest_{j}" for j in range(rest_cm.shape[1])]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode())
        f.write(chunk_rows.tobytes())
        f.write(packed.astype("<u4").tobytes())
        if rest_cm.shape[1]:
            f.write(sh_q.tobytes())
    return n


# ---------------------------------------------------------- camera files for trainers
# Poses and intrinsics as core.splat.sfm gives them (COLMAP's conventions, see there).

# OpenCV camera axes (x right, y down, z forward) to OpenGL's (x right, y up, z backward):
# flip the camera's y and z axes, i.e. right-multiply camera-to-world by diag(1, -1, -1, 1).
CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


def _camera_entry(cam: CameraIntrinsics) -> dict[str, Any]:
    return {
        "fl_x": cam.fx,
        "fl_y": cam.fy,
        "cx": cam.cx,
        "cy": cam.cy,
        "w": cam.width,
        "h": cam.height,
        "camera_model": "OPENCV",
        **cam.distortion(),
    }


def to_transforms_json(
    result: SfmResult, *, image_prefix: str = "images/", ply_file_path: str | None = None
) -> dict[str, Any]:
    """nerfstudio / instant-ngp ``transforms.json``.

    ``transform_matrix`` is camera-to-world in the OpenGL camera convention nerfstudio reads:
    ``[R^T | C] @ diag(1, -1, -1, 1)``, i.e. COLMAP's camera-to-world with the camera's y and
    z axes negated. The world frame is the result's: ``applied_transform`` is the 3x4
    (new from COLMAP's world) that ``run_sfm``'s ``orient`` applied (identity for ``none``),
    as nerfstudio records its own re-framing there; COLMAP's model on disk is already in
    this frame. ``up`` is the scene's up direction in it ([0, 0, 1] for ``z_up``), and
    ``orient`` the setting. (nerfstudio's own ``colmap_to_json`` swaps world x/y and negates
    z instead, recording that in ``applied_transform``; either is self-consistent.)
    Intrinsics go at the top level when one camera is shared, else into each frame.
    """
    cameras = {im.camera_id: im.intrinsics for im in result.images}
    shared = len(cameras) == 1
    out: dict[str, Any] = {}
    if shared:
        out.update(_camera_entry(next(iter(cameras.values()))))
    frames = []
    for image in result.images:
        frame: dict[str, Any] = {
            "file_path": f"{image_prefix}{image.name}",
            "transform_matrix": (image.camera_to_world @ CV_TO_GL).tolist(),
            "colmap_im_id": image.image_id,
        }
        if not shared:
            frame.update(_camera_entry(image.intrinsics))
        frames.append(frame)
    out["frames"] = frames
    out["applied_transform"] = np.asarray(result.applied_transform, np.float64)[:3].tolist()
    out["orient"] = result.orient
    if result.up is not None:
        out["up"] = [float(v) for v in result.up]
    if ply_file_path:
        out["ply_file_path"] = ply_file_path
    return out


def to_cameras_json(result: SfmResult) -> list[dict[str, Any]]:
    """The INRIA 3DGS ``cameras.json``: per camera ``position`` (the centre C) and
    ``rotation`` (3x3 camera-to-world, R^T, OpenCV camera axes), ``fx``/``fy`` in pixels,
    and ``img_name`` without extension, as ``camera_to_JSON`` in the INRIA code writes."""
    return [
        {
            "id": i,
            "img_name": Path(image.name).stem,
            "width": image.intrinsics.width,
            "height": image.intrinsics.height,
            "position": image.center.tolist(),
            "rotation": image.rotation.T.tolist(),
            "fx": image.intrinsics.fx,
            "fy": image.intrinsics.fy,
        }
        for i, image in enumerate(result.images)
    ]


def camera_to_world_from_transforms(matrix: Any) -> np.ndarray:
    """Inverse of the transforms.json convention: OpenGL camera-to-world back to OpenCV."""
    return np.asarray(matrix, dtype=np.float64) @ CV_TO_GL
