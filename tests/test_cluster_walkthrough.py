"""docs/cluster.md's local-cluster walk-through, run as written: the commands are read from the document.

Start the cluster (``cluster/local_cluster.py``), set up the client's token authentication with the
documented ``export`` line, ``ray job submit`` a 2 hosts × 2 devices run, read its logs, ``ray job stop``
it (a checkpoint at a step boundary), submit it again (it resumes and finishes).  What the test changes:
the dashboard port (a free one instead of 8265), ``$HOME`` (a fresh directory, so ``~/.ray/auth_token``
is the cluster's own), the run directory (under tmp) and the length (fewer steps, by dotted overrides
appended to the documented command).  Nothing else of the environment reaches the shell commands: no
``RAY_*`` variable is inherited.
"""

import json
import os
import re
import subprocess
import sys
import time

from test_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "cluster.md")
SHORTER = "data.steps=4001 model.hidden=16 train.steps=40 train.log_every=5 checkpoint.every=5 eval.at_end=false"


def documented_commands() -> list[str]:
    """The shell commands of the walk-through block (continuation lines joined, comments dropped)."""
    text = open(DOC).read()
    start = text.index("A local multi-node cluster")
    block = text[text.index("```\n", start) + 4:]
    block = block[:block.index("```")]
    commands = [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [re.sub(r"\s+", " ", c) for c in commands if c]


def shell(command: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_documented_local_cluster_walkthrough(tmp_path):
    commands = documented_commands()
    assert [c.split()[:3] for c in commands] == [
        ["python", "cluster/local_cluster.py", "--nodes"], ["export", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN=$(cat"],
        ["ray", "job", "submit"], ["ray", "job", "logs"], ["ray", "job", "stop"], ["ray", "job", "submit"]], commands
    start, auth, submit, logs, stop, resubmit = commands
    port = str(free_port())
    home = tmp_path / "home"
    home.mkdir()
    run_dir = tmp_path / "runs" / "l63-2hosts"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    adapt = lambda c: c.replace("8265", port).replace("$PWD/runs/l63-2hosts", str(run_dir))  # noqa: E731

    cluster = subprocess.Popen(["bash", "-c", f"{adapt(start)} --dashboard-port {port}"], env=env, cwd=ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in cluster.stdout:  # the cluster prints its banner once every node is up
            seen.append(line)
            if line.startswith("Ray cluster up"):
                break
        else:
            raise AssertionError("local_cluster.py exited before the cluster was up:\n" + "".join(seen)[-3000:])
        assert (home / ".ray" / "auth_token").exists()
        client = lambda c: shell(f"{auth}\n{adapt(c)}", env)  # noqa: E731

        out = client(f"{submit} {SHORTER}")
        assert out.returncode == 0, out.stdout + out.stderr
        checkpoints = run_dir / "checkpoints"
        t0 = time.time()
        while not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
            assert time.time() - t0 < 300, client(logs).stdout[-3000:]
            time.sleep(0.5)
        out = client(logs)
        assert out.returncode == 0 and "group_started" in open(run_dir / "events.jsonl").read(), out.stdout[-3000:]
        out = client(stop)
        assert out.returncode == 0, out.stdout + out.stderr
        t0 = time.time()
        while "stopped (signal) at step" not in (text := client(logs).stdout):
            assert time.time() - t0 < 120, text[-3000:]
            time.sleep(1)
        stopped = int(re.search(r"stopped \(signal\) at step (\d+)", text).group(1))
        assert 0 < stopped < 40

        out = client(f"{resubmit} {SHORTER}")  # no --no-wait: it follows the job to its end
        assert out.returncode == 0 and "succeeded" in out.stdout, (out.stdout + out.stderr)[-3000:]
        assert "distdeer: finished at step 40" in out.stdout, out.stdout[-3000:]
        assert f"from its checkpoint at step {stopped}" in out.stdout, out.stdout[-3000:]  # resumed, not restarted
        kinds = [json.loads(line)["event"] for line in open(run_dir / "events.jsonl")]
        assert kinds.count("job_started") == 2 and "stopped" in kinds and kinds[-1] == "finished", kinds
        steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
        assert steps == sorted(set(steps)) and steps[-1] == 40

        refused = shell(f"export RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)\n{adapt(logs)}", env, timeout=120)
        assert refused.returncode != 0  # the token without RAY_AUTH_MODE=token is not sent (hence the doc)
    finally:
        cluster.stdin.close()  # local_cluster.py shuts the cluster down at the end of its input
        try:
            cluster.wait(timeout=120)
        except subprocess.TimeoutExpired:
            cluster.kill()
