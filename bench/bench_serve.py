"""Local endpoint server benchmarks: JSON lines on stdout.

    python bench/bench_serve.py [--jobs 30] [--rounds 3] [--overhead-jobs 200]

1. Overhead per job: a trivial handler called directly, against the same handler behind the
   server (`POST /runsync` round trip, and `POST /run` then polling `/status`), sequentially.
2. Throughput at concurrency 1, 2, 4 for CPU tasks: one that releases the GIL (SHA-256 over
   a buffer, as numpy/torch/OpenCV work does) and one in pure Python (holds the GIL). Jobs/s
   from the server's own timestamps (first submission to last completion).

The server runs as a real process (`python -m core.serve bench/bench_serve.py:handler`), the
client here. The machine's load average is printed with each line: a shared machine skews it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUFFER = bytes(range(256)) * 4096 * 8  # 8 MiB


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """What the server runs: `kind` trivial | sha256 | python."""
    job_input = job["input"]
    kind = job_input.get("kind", "trivial")
    if kind == "sha256":  # hashlib releases the GIL on large buffers
        digest = b""
        for _ in range(job_input.get("rounds", 3)):
            digest = hashlib.sha256(BUFFER + digest).digest()
        return {"digest": digest.hex()}
    if kind == "python":
        total = 0
        for i in range(job_input.get("loops", 300_000)):
            total += i * i % 7
        return {"total": total}
    return {"n": job_input.get("n", 0)}


def emit(**fields: Any) -> None:
    fields["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(fields), flush=True)


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


class Server:
    def __init__(self, concurrency: int, workdir: Path) -> None:
        import requests

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.session = requests.Session()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVE_")}
        env.update(
            SERVE_DB_PATH=str(workdir / f"jobs-{concurrency}.sqlite3"),
            SERVE_PORT=str(self.port),
            SERVE_CONCURRENCY=str(concurrency),
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "core.serve", f"{Path(__file__).resolve()}:handler"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.session.get(f"{self.url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.session.post(self.url + path, json=body, timeout=120).json()

    def get(self, path: str) -> dict[str, Any]:
        return self.session.get(self.url + path, timeout=30).json()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_overhead(server: Server, jobs: int) -> None:
    direct = []
    for n in range(jobs):
        started = time.perf_counter()
        handler({"id": "direct", "input": {"n": n}})
        direct.append(time.perf_counter() - started)

    server.post("/runsync", {"input": {"n": -1}})  # warm
    runsync = []
    for n in range(jobs):
        started = time.perf_counter()
        body = server.post("/runsync", {"input": {"n": n}})
        runsync.append(time.perf_counter() - started)
        assert body["status"] == "COMPLETED" and body["output"] == {"n": n}, body

    polled = []
    for n in range(jobs // 2):
        started = time.perf_counter()
        job_id = server.post("/run", {"input": {"n": n}})["id"]
        while server.get(f"/status/{job_id}")["status"] != "COMPLETED":
            time.sleep(0.001)
        polled.append(time.perf_counter() - started)

    emit(
        bench="serve_overhead",
        handler="trivial",
        jobs=jobs,
        direct_us=round(statistics.median(direct) * 1e6, 2),
        runsync_ms=median_ms(runsync),
        runsync_p90_ms=round(statistics.quantiles(runsync, n=10)[-1] * 1000, 3),
        run_then_poll_ms=median_ms(polled),
        overhead_per_job_ms=round(median_ms(runsync) - median_ms(direct), 3),
    )


def run_batch(server: Server, kind: str, jobs: int) -> dict[str, float]:
    """One batch, measured by the server's own timestamps (first submission to last
    completion) and by the server process's CPU time over the same span."""
    import psutil

    process = psutil.Process(server.process.pid)
    cpu_before = sum(process.cpu_times()[:2])
    wall_before = time.monotonic()
    ids = {server.post("/run", {"input": {"kind": kind}})["id"] for _ in range(jobs)}
    while True:
        listing = server.get(f"/jobs?limit={jobs + 10}")
        ours = [j for j in listing["jobs"] if j["id"] in ids]
        if len(ours) == jobs and all(j["status"] == "COMPLETED" for j in ours):
            break
        time.sleep(0.02)
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    wall = time.monotonic() - wall_before
    first = min(datetime.fromisoformat(j["createdAt"]) for j in ours)
    last = max(datetime.fromisoformat(j["completedAt"]) for j in ours)
    return {
        "jobs_per_s": jobs / (last - first).total_seconds(),
        "execution_ms": statistics.mean(j["executionTime"] for j in ours),
        "cpu_per_wall": cpu / wall,  # cores the server kept busy: <= 1 while the GIL binds
    }


def bench_throughput(servers: dict[int, Server], jobs: int, rounds: int) -> None:
    """Batches at each concurrency, interleaved round by round so that a change in the
    machine's load (it may be shared) falls on every concurrency alike."""
    for kind in ("sha256", "python"):
        direct = []
        for _ in range(3):
            started = time.perf_counter()
            handler({"id": "direct", "input": {"kind": kind}})
            direct.append(time.perf_counter() - started)
        results: dict[int, list[dict[str, float]]] = {c: [] for c in servers}
        for server in servers.values():
            server.post("/runsync", {"input": {"kind": kind}})  # warm
        for _ in range(rounds):
            for concurrency, server in servers.items():
                results[concurrency].append(run_batch(server, kind, jobs))
        for concurrency, batches in results.items():
            emit(
                bench="serve_throughput",
                task=kind,
                concurrency=concurrency,
                jobs=jobs,
                rounds=rounds,
                jobs_per_s_median=round(statistics.median(b["jobs_per_s"] for b in batches), 2),
                jobs_per_s_best=round(max(b["jobs_per_s"] for b in batches), 2),
                execution_ms_median=round(statistics.median(b["execution_ms"] for b in batches)),
                server_cpu_per_wall=round(statistics.median(b["cpu_per_wall"] for b in batches), 2),
                job_ms_direct=median_ms(direct),
                cpu_count=os.cpu_count(),
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--overhead-jobs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        servers = {c: Server(c, Path(tmp)) for c in (1, 2, 4)}
        try:
            bench_overhead(servers[1], args.overhead_jobs)
            bench_throughput(servers, args.jobs, args.rounds)
        finally:
            for server in servers.values():
                server.close()


if __name__ == "__main__":
    main()
