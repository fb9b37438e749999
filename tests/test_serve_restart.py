"""The local endpoint server as a real process (`python -m core.serve ...`), killed with
SIGKILL while jobs are queued and running, then started again on the same SQLite store."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.serve_helpers import ServerProcess, start_server_process, wait_until

HANDLER = "tests.serve_helpers:file_gated"


def executions(log: Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


def test_sigkill_then_restart_keeps_results_and_runs_the_queue(tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    first = start_server_process(HANDLER, tmp_path)
    servers: list[ServerProcess] = [first]
    try:
        client = first.client
        done = client.run({"n": 2, "log": str(log)})
        assert client.wait_final(done)["output"] == {"square": 4}
        running = client.run({"n": 3, "log": str(log), "gate": str(tmp_path / "never")})
        client.wait_status(running, ("IN_PROGRESS",))
        queued = [client.run({"n": n, "log": str(log)}) for n in (4, 5)]
        assert [client.status(j)["status"] for j in queued] == ["IN_QUEUE", "IN_QUEUE"]
        first.kill()

        second = start_server_process(HANDLER, tmp_path)
        servers.append(second)
        client = second.client
        # The finished result survived; the queued jobs run; the running one is FAILED, saying why.
        assert client.status(done)["output"] == {"square": 4}
        interrupted = client.wait_final(running)
        assert interrupted["status"] == "FAILED" and "interrupted" in interrupted["error"]
        for job_id, n in zip(queued, (4, 5), strict=True):
            body = client.wait_final(job_id)
            assert body["status"] == "COMPLETED" and body["output"] == {"square": n * n}
        assert executions(log) == Counter({done: 1, queued[0]: 1, queued[1]: 1})

        # With SERVE_REQUEUE_INTERRUPTED the interrupted job runs again on the next start.
        gate = tmp_path / "gate"
        again = client.run({"n": 6, "log": str(log), "gate": str(gate)})
        client.wait_status(again, ("IN_PROGRESS",))
        second.kill()
        third = start_server_process(HANDLER, tmp_path, SERVE_REQUEUE_INTERRUPTED="true")
        servers.append(third)
        gate.touch()
        body = third.client.wait_final(again)
        assert body["status"] == "COMPLETED" and body["output"] == {"square": 36}
        listing = third.client.call("GET", "/jobs?status=COMPLETED").json()["jobs"]
        assert {j["id"]: j["attempts"] for j in listing}[again] == 2
        assert executions(log)[again] == 1  # its first start never got past the gate
        assert third.client.health()["jobs"]["retried"] == 1
        assert "requeued" in third.log() and "failed" in second.log().lower()
    finally:
        for server in servers:
            server.stop()
    wait_until(lambda: all(s.process.poll() is not None for s in servers))
