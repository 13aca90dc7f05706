"""``launch/train.py`` in local mode (no ``RAY_ADDRESS``): its private Ray outlives a signal to the
launcher's whole process group, so the run checkpoints and ends with exit 0, and it is private — token
authentication on (a client without the run's token is refused) and the JAX coordinator on loopback."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "train.py")
CONFIG = """
data: {steps: 2001, noise: 0.05}
model: {kind: clipped_shplrnn, latent: 3, hidden: 8}
train: {steps: 600, log_every: 1}
checkpoint: {every: 200, keep: 2}
eval: {at_end: false}
"""


def steps_logged(run_dir) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def events(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


def started(run_dir) -> bool:
    """The launcher has written its first event (the private cluster's address) in full."""
    try:
        with open(os.path.join(run_dir, "events.jsonl")) as f:
            return f.readline().endswith("\n")
    except FileNotFoundError:
        return False


def listening(port: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.split()[3].endswith(f":{port}")]


def refusal(address: str, env: dict) -> tuple[bool, str]:
    """Start a Ray client with a wrong token against ``address``; (whether it printed "InvalidAuthToken"
    within 10 s, everything it printed on stdout and stderr).  The client is killed either way: refused, it
    would retry until its own, much longer, timeout."""
    client = subprocess.Popen(
        [sys.executable, "-c", f"import ray; ray.init(address={address!r}); print('CONNECTED')"],
        env=dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in client.stdout:
            lines.append(line)
            if "InvalidAuthToken" in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen.wait(timeout=10)
    client.kill()
    client.wait()
    reader.join(timeout=10)
    return seen.is_set(), "".join(lines)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_checkpoints_and_exits_0(tmp_path, sig):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    run_dir = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, LAUNCH, str(cfg), f"run.dir={run_dir}", "--hosts", "2", "--devices-per-host", "1"]
    # its own process group, as a shell job or a batch scheduler's job would be
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300

        def wait(what, ready):
            while not ready():
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                assert time.time() < deadline, f"no {what} within 300 s"
                time.sleep(0.1)

        # private: Ray refuses a client without the run's token (checked while the processes compile) ...
        wait("Ray cluster", lambda: started(run_dir))
        address = events(run_dir)[0]["ray_address"]
        # a client with another token: Ray answers "InvalidAuthToken" and the client never connects (it
        # retries until its own timeout; the first refusal, or 10 s of them, is enough here)
        refused, s_out = refusal(address, env)
        assert refused and "CONNECTED" not in s_out, s_out[-2000:]
        wait("training step", lambda: steps_logged(run_dir) >= 10)
        # ... and the JAX coordinator listens on loopback only
        with open(os.path.join(run_dir, "hosts.json")) as f:
            coordinator = json.load(f)["coordinator"]
        assert coordinator.startswith("127.0.0.1:")
        bound = listening(int(coordinator.rsplit(":", 1)[1]))
        assert bound and all("127.0.0.1" in a for a in bound), bound
        os.killpg(proc.pid, getattr(signal, sig))
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "GCS" not in out, out[-3000:]
    ends = [line for line in out.splitlines() if line.startswith("distdeer: stopped (signal) at step")]
    assert len(ends) == 1, out[-3000:]
    stopped = events(run_dir)[-1]
    assert stopped["event"] == "stopped" and stopped["step"] >= 10
    # the checkpoint is at that step boundary: the same command resumes there and finishes
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    starts = [e for e in events(run_dir) if e["event"] == "training"]
    assert starts[-1]["step"] > stopped["step"] and events(run_dir)[-1]["event"] == "finished"
    assert events(run_dir)[-1]["step"] == 600
