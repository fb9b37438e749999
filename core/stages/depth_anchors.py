"""Known inverse depth at a few pixels per frame, from a camera solve's sparse points: what
ties a clip's relative depth to one scale (`video_depth.align_disparity`'s `anchors`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_ANCHORS_PER_FRAME = 400


def depth_anchors(
    solve: Any, masks: Sequence[np.ndarray] | None, max_per_frame: int = MAX_ANCHORS_PER_FRAME
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per frame: (pixels [m, 2] as (x, y), inverse depth [m]) of the solve's sparse points
    that project into the frame in front of its camera, off the subject's mask (a point of
    the background behind the subject is hidden there); None for an unregistered frame.

    `solve` is a `core.stages.camera.CameraSolve` (poses with `world_to_camera`, `points`,
    `intrinsics`, `width`, `height`)."""
    intr = solve.intrinsics
    k = np.array([[intr["fx"], 0, intr["cx"]], [0, intr["fy"], intr["cy"]], [0, 0, 1.0]])
    points = np.asarray(solve.points, np.float64).reshape(-1, 3)
    rng = np.random.default_rng(0)
    anchors: list[tuple[np.ndarray, np.ndarray] | None] = []
    for index, pose in enumerate(solve.poses):
        if not pose.registered or pose.world_to_camera is None or len(points) == 0:
            anchors.append(None)
            continue
        w2c = np.asarray(pose.world_to_camera)
        cam = points @ w2c[:3, :3].T + w2c[:3, 3]
        front = cam[:, 2] > 1e-6
        uvw = cam[front] @ k.T
        uv = uvw[:, :2] / uvw[:, 2:3]
        z = cam[front, 2]
        inside = (
            (uv[:, 0] >= 0) & (uv[:, 0] < solve.width) & (uv[:, 1] >= 0) & (uv[:, 1] < solve.height)
        )
        uv, z = uv[inside], z[inside]
        if masks is not None and len(uv):
            mask = masks[index]
            off = ~mask[uv[:, 1].astype(int), uv[:, 0].astype(int)]
            uv, z = uv[off], z[off]
        if len(uv) > max_per_frame:
            pick = rng.choice(len(uv), max_per_frame, replace=False)
            uv, z = uv[pick], z[pick]
        anchors.append((uv.astype(np.float32), (1.0 / z).astype(np.float32)) if len(uv) else None)
    return anchors
