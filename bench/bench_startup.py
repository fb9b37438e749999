"""Start-up time of a worker: from process start to its "ready" log line (models preloaded,
about to take jobs), as JSON lines. Each run starts a fresh process that runs one health job
through the RunPod SDK's local mode and exits.

Here, with this checkout's venv (the three YOLO models preloaded from random-weight checkpoints
of the real architectures):

    python bench/bench_startup.py --runs 3

Inside a built image, through any wrapper command (scripts/build_images.sh does this):

    python bench/bench_startup.py --label infer-image --runs 3 -- buildah run CONTAINER -- \
        python -u handlers/infer.py --test_input '{"input": {"task": "health"}}'

A VFX job as the first job (models preloaded, start to the job's result in `total_s`):

    python bench/bench_startup.py --preload depth-estimation --job @vfx_job.json

`spawn_to_ready_s` is measured from here (so it includes the interpreter's and the libraries'
imports, and the wrapper's own start); `reported_ready_s` is what the worker logs itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"ready in ([0-9.]+) s|worker ready")
HEALTH_JOB = json.dumps({"input": {"task": "health"}})


def run_once(
    command: list[str], env: dict[str, str], timeout_s: float, log: Path | None = None
) -> dict[str, Any]:
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    killer = threading.Timer(timeout_s, process.kill)  # a hung start must not hang the bench
    killer.start()
    ready_s: float | None = None
    reported: float | None = None
    tail: list[str] = []
    log_file = log.open("w") if log is not None else None
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if log_file is not None:
                log_file.write(line)
            tail = [*tail[-20:], line.rstrip()]
            match = READY.search(line)
            if match and ready_s is None:
                ready_s = time.perf_counter() - started
                reported = float(match.group(1)) if match.group(1) else None
        code = process.wait()
    finally:
        killer.cancel()
        if log_file is not None:
            log_file.close()
    result: dict[str, Any] = {
        "spawn_to_ready_s": round(ready_s, 2) if ready_s is not None else None,
        "reported_ready_s": reported,
        "exit_code": code,
        "total_s": round(time.perf_counter() - started, 2),
    }
    if ready_s is None or code != 0:
        result["log_tail"] = tail
    return result


def local_command_and_env(
    preload: str, job: str = HEALTH_JOB
) -> tuple[list[str], dict[str, str], Path]:
    sys.path.insert(0, str(REPO))
    from scripts.make_test_weights import make_yolo_checkpoints

    weights = Path(tempfile.mkdtemp(prefix="bench-startup-weights-"))
    make_yolo_checkpoints(weights)
    if "depth-estimation" in preload:
        from scripts.make_test_weights_depth import make_depth_checkpoint

        make_depth_checkpoint(weights)
    env = dict(os.environ)
    env.update(
        WEIGHTS_DIR=str(weights),
        VOLUME_WEIGHTS_DIR=str(weights / "no-volume"),
        ALLOW_MODEL_DOWNLOADS="false",
        PRELOAD_MODELS=preload,
        PYTHONUNBUFFERED="1",
        YOLO_CONFIG_DIR=str(weights / "ultralytics-config"),
        OUTPUT_DIR=str(weights / "outputs"),  # where a VFX job keeps its project
    )
    command = [sys.executable, "-u", "handlers/infer.py", "--test_input", job]
    return command, env, weights


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="infer-local")
    parser.add_argument(
        "--preload",
        default="object-detection,image-segmentation,pose-estimation",
        help="PRELOAD_MODELS for the local run (a wrapped command keeps its own environment)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--log", type=Path, help="write the (last) run's whole output here")
    parser.add_argument(
        "--job", default=HEALTH_JOB, help="the local run's first job: JSON, or @file holding it"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to time")
    args = parser.parse_args()

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        env = dict(os.environ)
    else:
        job = Path(args.job[1:]).read_text() if args.job.startswith("@") else args.job
        command, env, _weights = local_command_and_env(args.preload, job)

    results = []
    for run in range(1, args.runs + 1):
        result = run_once(command, env, args.timeout, args.log)
        results.append(result)
        print(json.dumps({"bench": "startup", "label": args.label, "run": run, **result}))
    ready = [r["spawn_to_ready_s"] for r in results if r["spawn_to_ready_s"] is not None]
    reported = [r["reported_ready_s"] for r in results if r["reported_ready_s"] is not None]
    summary = {
        "bench": "startup_summary",
        "label": args.label,
        "runs": len(results),
        "failed_runs": sum(
            1 for r in results if r["exit_code"] != 0 or r["spawn_to_ready_s"] is None
        ),
        "first_spawn_to_ready_s": ready[0] if ready else None,
        "median_spawn_to_ready_s": round(statistics.median(ready), 2) if ready else None,
        "median_reported_ready_s": round(statistics.median(reported), 2) if reported else None,
    }
    print(json.dumps(summary))
    if summary["failed_runs"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
