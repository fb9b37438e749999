"""Helpers of scripts/build_images.sh (standard library only), one subcommand each:

pip-config OUT        write a pip.conf for builds from this machine's pip settings; print the
                      `-v HOST:CONTAINER:ro` mounts the build needs for it (local indexes, ...)
check-infer RESULT LOG        check the infer worker's result and log from inside an image
check-splat RESULT LOG ROOT   the same for the splat worker; ROOT is the container's rootfs
steps LOG             which build steps ran and which came from the layer cache
layers OLD NEW        which layers differ between two images (`buildah inspect` JSON)
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

PIP_KEYS = ("index-url", "extra-index-url", "find-links", "constraint", "cert", "trusted-host")
CONTAINER_CA = "/run/build-pip/ca.crt"  # not /etc/ssl/certs: the image's own apt writes there
SHAPES = {"circle", "square", "triangle"}


class CheckFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# pip-config


def pip_settings() -> dict[str, str]:
    """This machine's effective pip settings: config files, then PIP_* variables on top."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    settings: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.match(r"^(global|install|:env:)\.([\w-]+)='(.*)'$", line.strip())
        if match and match.group(2) in PIP_KEYS:
            (env if match.group(1) == ":env:" else settings)[match.group(2)] = match.group(3)
    settings.update(env)
    return settings


def local_path(value: str) -> Path | None:
    if value.startswith("file://"):
        return Path(unquote(urlparse(value).path))
    if value.startswith("/"):
        return Path(value)
    return None


def pip_config(out: Path) -> list[str]:
    settings = pip_settings()
    mounts: dict[str, str] = {}
    lines = ["[global]"]
    for key, value in settings.items():
        if key == "cert":
            if Path(value).is_file():
                mounts[str(Path(value).resolve())] = CONTAINER_CA
                lines.append(f"cert = {CONTAINER_CA}")
            continue
        for token in value.split():
            path = local_path(token)
            if path is None or not path.exists():
                continue
            # A file:// index links its files relative to itself (../../files/x.whl): take the
            # folder around the index too.
            where = path.parent if token.startswith("file://") and path.name == "simple" else path
            mounts[str(where)] = str(where)
        lines.append(f"{key} = {value}")
    out.write_text("\n".join(lines) + "\n")
    mounts[str(out.resolve())] = "/etc/pip.conf"
    return [f"{host}:{inside}:ro" for host, inside in mounts.items()]


# Worker checks


def load_result(path: Path) -> dict[str, Any]:
    check(path.is_file(), f"the worker wrote no result at {path}")
    result = json.loads(path.read_text())
    check("error" not in result, f"the job failed: {result.get('error')}")
    return result


BAKED_DEFAULTS = [
    "yolo11n.pt",
    "yolo11n-seg.pt",
    "yolo11n-pose.pt",
    "sam2.1_hiera_tiny.pt",
    "depth-anything-v2-small",
]


def check_infer(result_path: Path, log_path: Path) -> dict[str, Any]:
    log = log_path.read_text(errors="replace")
    result = load_result(result_path)
    ready = re.search(r"ready in ([0-9.]+) s with (\d+) preloaded model\(s\): (.*)", log)
    check(ready is not None, "no 'ready in' line: the worker did not report itself ready")
    assert ready is not None
    preloaded = [name.strip() for name in ready.group(3).split(",")]
    # One entry per preloaded task; velocity-estimation reports its detector (RAFT loads too).
    expected = [*BAKED_DEFAULTS, "yolo11n.pt"]
    check(
        preloaded == expected,
        f"the image's PRELOAD_MODELS should preload the baked defaults {expected}, got {preloaded}",
    )
    check(result.get("task") == "object-detection", f"unexpected task {result.get('task')}")
    detections = result["results"][0]["detections"]
    labels = {d["label"] for d in detections}
    check(len(detections) >= 1, "no detection on the test image")
    check(labels <= SHAPES, f"labels {labels} are not the shapes detector's")
    check(min(d["confidence"] for d in detections) >= 0.5, "a detection under the 0.5 threshold")
    return {
        "check": "infer",
        "ok": True,
        "ready_s": float(ready.group(1)),
        "preloaded": preloaded,
        "detections": len(detections),
        "labels": sorted(labels),
        "device": result.get("device"),
    }


def check_splat(result_path: Path, log_path: Path, rootfs: Path) -> dict[str, Any]:
    log = log_path.read_text(errors="replace")
    check("splat worker ready" in log, "no 'splat worker ready' line in the log")
    result = load_result(result_path)
    check(result.get("task") == "splat", f"unexpected task {result.get('task')}")
    sfm = result["sfm"]
    check(sfm["registered_fraction"] >= 0.9, f"SfM registered only {sfm['registered_fraction']}")
    training = result["training"]
    check(training["psnr"] > training["psnr_start"], "training did not raise the held-out PSNR")
    names = {a["name"] for a in result["artifacts"]}
    check({"splat.ply", "scene.splat"} <= names, f"artifacts {sorted(names)} lack the splat")
    for artifact in result["artifacts"]:
        check(artifact.get("storage") == "local", f"{artifact['name']} was not written locally")
        path = rootfs / artifact["path"].lstrip("/")
        check(path.is_file(), f"{artifact['name']} is not at {artifact['path']} in the container")
        data = path.read_bytes()
        check(len(data) == artifact["bytes"], f"{artifact['name']}: size differs from the result")
        check(
            hashlib.sha256(data).hexdigest() == artifact["sha256"],
            f"{artifact['name']}: sha256 differs from the result",
        )
    return {
        "check": "splat",
        "ok": True,
        "registered_fraction": sfm["registered_fraction"],
        "psnr_start": training["psnr_start"],
        "psnr": training["psnr"],
        "artifacts": sorted(names),
        "device": result.get("device"),
    }


# Build reports


def build_steps(log_path: Path) -> dict[str, Any]:
    """buildah's log: `STEP n/m: INSTRUCTION`, then `--> Using cache` when the cache served it."""
    steps: list[dict[str, Any]] = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = re.match(r"^STEP (\d+)/(\d+): (.*)$", line)
        if match:
            steps.append({"step": int(match.group(1)), "instruction": match.group(3)[:90]})
            steps[-1]["cached"] = False
        elif steps and "Using cache" in line:
            steps[-1]["cached"] = True
    layer_steps = [s for s in steps if s["instruction"].split(" ", 1)[0] in {"RUN", "COPY", "ADD"}]
    return {
        "steps": len(steps),
        "cached": sum(1 for s in steps if s["cached"]),
        "rebuilt_layer_steps": [s["instruction"] for s in layer_steps if not s["cached"]],
    }


def image_layers(inspect: dict[str, Any]) -> list[tuple[str, str]]:
    """(diff id, instruction) of each layer: history entries that are not empty, in order."""
    config = inspect.get("Docker") or inspect.get("OCIv1") or {}
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    history = [h for h in config.get("history", []) if not h.get("empty_layer")]
    names = [re.sub(r"\s+", " ", h.get("created_by", "?"))[-90:] for h in history]
    names = ["(base image)"] * (len(diff_ids) - len(names)) + names
    return list(zip(diff_ids, names[-len(diff_ids) :], strict=True))


def changed_layers(old_path: Path, new_path: Path) -> dict[str, Any]:
    old = image_layers(json.loads(old_path.read_text()))
    new = image_layers(json.loads(new_path.read_text()))
    changed = [name for i, (digest, name) in enumerate(new) if i >= len(old) or old[i][0] != digest]
    return {"layers": len(new), "changed": len(changed), "changed_layers": changed}


def main(argv: list[str]) -> int:
    command, args = argv[0], [Path(a) for a in argv[1:]]
    try:
        if command == "pip-config":
            print("\n".join(pip_config(args[0])))
            return 0
        if command == "check-infer":
            report = check_infer(args[0], args[1])
        elif command == "check-splat":
            report = check_splat(args[0], args[1], args[2])
        elif command == "steps":
            report = build_steps(args[0])
        elif command == "layers":
            report = changed_layers(args[0], args[1])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except CheckFailed as exc:
        print(json.dumps({"check": command, "ok": False, "error": str(exc)}))
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
