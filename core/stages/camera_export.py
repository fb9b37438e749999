"""Camera export: a solved camera as `camera_data.json`, a Nuke `.chan` and a Blender script.

Axis conventions (also written into camera_data.json under `convention`):

- The solve is COLMAP's: `x_cam = R @ x_world + t` with the camera looking down +Z, +X right,
  +Y down (OpenCV). camera_data.json keeps that matrix (`world_to_camera`) for each frame.
- The scene convention the compositor formats use is COLMAP's world turned 180 degrees about
  X (`F = diag(1, -1, -1)`): +Y up, +Z toward the viewer of the first frame, the camera looking
  down its -Z with +Y up (OpenGL, Nuke, Blender's camera). `camera_to_world` in
  camera_data.json is in this convention: `F @ inv([R|t]) @ F`. Units are the solve's own
  (arbitrary) scale.
- Nuke `.chan`: one line per frame, `frame tx ty tz rx ry rz vfov` (degrees), rotation order
  ZXY, Nuke's default, meaning Z is applied first: `R = Ry(ry) @ Rx(rx) @ Rz(rz)`; vfov is the
  vertical field of view (set the Camera's vertical aperture to match the plate's aspect).
- Blender: Z up, so the scene is turned +90 degrees about X (`(x, y, z) -> (x, -z, y)`); the
  script sets `matrix_world`, the lens from fx (36 mm sensor, horizontal fit) and the shift
  from the principal point, and keys every registered frame.

Frames that did not register are listed in camera_data.json (`registered: false`, no
matrices) and left out of the `.chan` and the script, which key only solved frames.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core.stages.ingest import Ingested

FLIP = np.diag([1.0, -1.0, -1.0])
"""COLMAP's world and camera axes to the scene convention (a 180 degree turn about X)."""
TO_BLENDER = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
"""The scene's +Y up to Blender's +Z up (+90 degrees about X)."""
SENSOR_WIDTH_MM = 36.0
CONVENTION = {
    "world_to_camera": "COLMAP/OpenCV: x_cam = R x_world + t; camera +X right, +Y down, looks +Z",
    "camera_to_world": (
        "scene convention: COLMAP's world turned 180 deg about X (F = diag(1,-1,-1)); "
        "camera looks down -Z, +Y up (OpenGL/Nuke); F inv([R|t]) F"
    ),
    "nuke_chan": "frame tx ty tz rx ry rz vfov; degrees; rotation order ZXY: R = Ry Rx Rz",
    "blender": "scene turned +90 deg about X for Z up; 36 mm sensor, horizontal fit",
    "units": "the solve's own scale (arbitrary)",
}


class SolvedPose(Protocol):
    """One frame of a camera solve (`core.stages.camera.FramePose` has these)."""

    @property
    def frame(self) -> int: ...
    @property
    def registered(self) -> bool: ...
    @property
    def world_to_camera(self) -> np.ndarray | None: ...
    @property
    def reprojection_error(self) -> float | None: ...


@dataclass(frozen=True)
class Intrinsics:
    fx: float
    fy: float
    cx: float
    cy: float
    model: str = "PINHOLE"
    distortion: dict[str, float] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Intrinsics:
        distortion = values.get("distortion")
        return cls(
            float(values["fx"]),
            float(values["fy"]),
            float(values["cx"]),
            float(values["cy"]),
            str(values.get("model", "PINHOLE")),
            {str(k): float(v) for k, v in distortion.items()} if distortion else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "fx": self.fx,
            "fy": self.fy,
            "cx": self.cx,
            "cy": self.cy,
            "distortion": self.distortion or {},
        }


def scene_camera_to_world(world_to_camera: np.ndarray) -> np.ndarray:
    """COLMAP's 4x4 world-to-camera -> the scene convention's 4x4 camera-to-world."""
    rotation, translation = world_to_camera[:3, :3], world_to_camera[:3, 3]
    matrix = np.eye(4)
    matrix[:3, :3] = FLIP @ rotation.T @ FLIP
    matrix[:3, 3] = FLIP @ (-rotation.T @ translation)
    return matrix


def colmap_world_to_camera(camera_to_world: np.ndarray) -> np.ndarray:
    """The inverse of `scene_camera_to_world`."""
    rotation_cw = FLIP @ camera_to_world[:3, :3] @ FLIP
    centre = FLIP @ camera_to_world[:3, 3]
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_cw.T
    matrix[:3, 3] = -rotation_cw.T @ centre
    return matrix


def euler_zxy(rotation: np.ndarray) -> tuple[float, float, float]:
    """(rx, ry, rz) in degrees with `rotation = Ry(ry) @ Rx(rx) @ Rz(rz)` (Nuke's ZXY)."""
    rx = math.asin(float(np.clip(-rotation[1, 2], -1.0, 1.0)))
    if abs(rotation[1, 2]) < 1 - 1e-9:
        ry = math.atan2(rotation[0, 2], rotation[2, 2])
        rz = math.atan2(rotation[1, 0], rotation[1, 1])
    else:  # gimbal lock: rz folds into ry
        ry = math.atan2(-rotation[2, 0], rotation[0, 0])
        rz = 0.0
    return math.degrees(rx), math.degrees(ry), math.degrees(rz)


def rotation_zxy(rx: float, ry: float, rz: float) -> np.ndarray:
    """`Ry(ry) @ Rx(rx) @ Rz(rz)` from degrees."""
    a, b, c = (math.radians(v) for v in (rx, ry, rz))
    rot_x = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rot_y = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rot_z = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rot_y @ rot_x @ rot_z


def vertical_fov_deg(intrinsics: Intrinsics, height: int) -> float:
    return math.degrees(2 * math.atan(height / (2 * intrinsics.fy)))


def camera_data(
    ingested: Ingested,
    intrinsics: Intrinsics,
    poses: Sequence[SolvedPose],
    *,
    solver: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """camera_data.json: every ingested frame, tied to its source frame number and time,
    with its intrinsics and (when registered) both matrices; `frames` lists them all and
    `num_cameras` counts the registered ones (the seed's count of exported cameras)."""
    by_position = {pose.frame: pose for pose in poses}
    entries = []
    for position, record in enumerate(ingested.frames):
        pose = by_position.get(position)
        entry: dict[str, Any] = {
            **record.as_dict(),
            "registered": bool(pose is not None and pose.registered),
            "intrinsics": intrinsics.as_dict(),
        }
        if pose is not None and pose.registered and pose.world_to_camera is not None:
            world_to_camera = np.asarray(pose.world_to_camera, dtype=np.float64)
            camera_to_world = scene_camera_to_world(world_to_camera)
            entry["world_to_camera"] = _rows(world_to_camera)
            entry["camera_to_world"] = _rows(camera_to_world)
            entry["position"] = [round(float(v), 9) for v in camera_to_world[:3, 3]]
            entry["rotation_zxy_deg"] = [round(v, 6) for v in euler_zxy(camera_to_world[:3, :3])]
            if pose.reprojection_error is not None:
                entry["reprojection_error"] = round(float(pose.reprojection_error), 4)
        else:
            entry["world_to_camera"] = None
            entry["camera_to_world"] = None
            entry["flag"] = "not_registered"
        entries.append(entry)
    registered = sum(1 for e in entries if e["registered"])
    return {
        "version": 1,
        "width": ingested.width,
        "height": ingested.height,
        "fps": ingested.fps,
        "source_fps": ingested.source_fps,
        "intrinsics": intrinsics.as_dict(),
        "vertical_fov_deg": round(vertical_fov_deg(intrinsics, ingested.height), 6),
        "frame_count": len(entries),
        "num_cameras": registered,
        "convention": CONVENTION,
        "solver": solver or {},
        "frames": entries,
    }


def _rows(matrix: np.ndarray) -> list[list[float]]:
    return [[round(float(v), 9) for v in row] for row in matrix]


def nuke_chan(data: dict[str, Any]) -> str:
    """The registered frames as a Nuke `.chan` (see the module docstring), by frame number."""
    vfov = data["vertical_fov_deg"]
    lines = []
    for entry in data["frames"]:
        if not entry["registered"]:
            continue
        matrix = np.asarray(entry["camera_to_world"])
        rx, ry, rz = euler_zxy(matrix[:3, :3])
        tx, ty, tz = matrix[:3, 3]
        values = (tx, ty, tz, rx, ry, rz, vfov)
        lines.append(f"{entry['frame']} " + " ".join(f"{v:.9f}" for v in values))
    return "\n".join(lines) + "\n"


def read_chan(text: str) -> dict[int, tuple[np.ndarray, float]]:
    """A `.chan` back to {frame: (4x4 scene camera-to-world, vfov degrees)}."""
    cameras = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        frame = int(float(fields[0]))
        tx, ty, tz, rx, ry, rz = (float(v) for v in fields[1:7])
        matrix = np.eye(4)
        matrix[:3, :3] = rotation_zxy(rx, ry, rz)
        matrix[:3, 3] = (tx, ty, tz)
        cameras[frame] = (matrix, float(fields[7]) if len(fields) > 7 else float("nan"))
    return cameras


def blender_matrices(data: dict[str, Any]) -> list[dict[str, Any]]:
    """{frame, matrix_world} per registered frame, in Blender's Z-up world."""
    turn = np.eye(4)
    turn[:3, :3] = TO_BLENDER
    out = []
    for entry in data["frames"]:
        if entry["registered"]:
            world = turn @ np.asarray(entry["camera_to_world"])
            out.append({"frame": entry["frame"], "matrix_world": _rows(world)})
    return out


BLENDER_TEMPLATE = '''"""Blender camera import: run in Blender's Text Editor (`blender -P {name}`).
Made by the VFX ingest platform from camera_data.json; the scene is Z up (the solve's
Y-up scene convention turned +90 degrees about X); units are the solve's own scale."""
import json

import bpy
from mathutils import Matrix

CAMERA = json.loads(r"""{camera}""")
FRAMES = json.loads(r"""{frames}""")

scene = bpy.context.scene
scene.render.resolution_x = CAMERA["width"]
scene.render.resolution_y = CAMERA["height"]
scene.render.fps = max(1, round(CAMERA["fps"]))
camera_data = bpy.data.cameras.new("vfx_camera")
camera_data.sensor_fit = "HORIZONTAL"
camera_data.sensor_width = CAMERA["sensor_width_mm"]
camera_data.lens = CAMERA["lens_mm"]
camera_data.shift_x = CAMERA["shift_x"]
camera_data.shift_y = CAMERA["shift_y"]
camera = bpy.data.objects.new("vfx_camera", camera_data)
scene.collection.objects.link(camera)
scene.camera = camera
for item in FRAMES:
    camera.matrix_world = Matrix(item["matrix_world"])
    camera.keyframe_insert(data_path="location", frame=item["frame"])
    camera.keyframe_insert(data_path="rotation_euler", frame=item["frame"])
if FRAMES:
    scene.frame_start = FRAMES[0]["frame"]
    scene.frame_end = FRAMES[-1]["frame"]
'''


def blender_script(data: dict[str, Any], name: str = "camera_blender.py") -> str:
    intrinsics = Intrinsics.from_dict(data["intrinsics"])
    width, height = data["width"], data["height"]
    camera = {
        "width": width,
        "height": height,
        "fps": data["fps"],
        "sensor_width_mm": SENSOR_WIDTH_MM,
        "lens_mm": intrinsics.fx * SENSOR_WIDTH_MM / width,
        # Blender's shift is in units of the sensor's fitted side (the width here).
        "shift_x": (width / 2 - intrinsics.cx) / width,
        "shift_y": (intrinsics.cy - height / 2) / width,
    }
    return BLENDER_TEMPLATE.format(
        name=name, camera=json.dumps(camera), frames=json.dumps(blender_matrices(data))
    )


def read_blender_frames(script: str) -> list[dict[str, Any]]:
    """The keyed frames a script made by `blender_script` holds (for checks, without Blender)."""
    start = script.index('FRAMES = json.loads(r"""') + len('FRAMES = json.loads(r"""')
    frames: list[dict[str, Any]] = json.loads(script[start : script.index('""")', start)])
    return frames
