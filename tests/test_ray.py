"""Multi-host training under Ray on a real local multi-node cluster (``ray.cluster_utils.Cluster``).

One module-scoped cluster: a head without CPUs (it hosts the job driver's services) and three 1-CPU
worker nodes, so that a 2-process group (STRICT_SPREAD) can be re-placed after a node is removed.
Ray's token authentication stays on (a token in the environment, as a user would set it).
Every run is ``launch/train.py`` as a real driver process; workers are 2 JAX processes × 2 simulated
CPU devices.  The uninterrupted 2-host run is the baseline the fault-tolerance tests compare with.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "train.py")
STEPS = 60
WATCHDOG_S = 10  # the hang test's
CONFIG = f"""
data: {{steps: 2001, noise: 0.05}}
model: {{kind: clipped_shplrnn, latent: 3, hidden: 8}}
gtf: {{mode: adaptive, every: 5}}
train: {{steps: {STEPS}, lr: 2.0e-3, lr_end: 5.0e-4, log_every: 1}}
checkpoint: {{every: 5, keep: 2}}
ray: {{max_failures: 2, watchdog_s: 20, startup_s: 600}}
eval: {{at_end: false}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.setenv("DISTDEER_COMPILATION_CACHE", str(tmp_path_factory.mktemp("jax-cache")))
    mp.setenv("RAY_DEDUP_LOGS", "0")
    from ray._raylet import Config

    Config.initialize("")  # re-read RAY_AUTH_MODE if ray was imported earlier (what ray.init does itself)
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
    for _ in range(3):  # agents on ports of their own: Ray's default port is one per machine
        c.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
    c.wait_for_nodes()
    yield c
    c.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(CONFIG)
    return str(path)


def launch(cluster, config_file, run_dir, *extra, hosts=2, devices=2, wait=True):
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    cmd = [sys.executable, LAUNCH, config_file, f"run.dir={run_dir}", *extra, "--hosts", str(hosts),
           "--devices-per-host", str(devices)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def metrics(run_dir) -> dict[int, dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = {}
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                row = json.loads(line)
                rows[row["step"]] = row
    return rows


def events(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


def hosts(run_dir) -> dict:
    with open(os.path.join(run_dir, "hosts.json")) as f:
        return json.load(f)


def wait_for_step(run_dir, step, proc, timeout=300):
    t0 = time.time()
    while max(metrics(run_dir), default=0) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - t0 < timeout, "run made no progress"
        time.sleep(0.05)


def final_sha(run_dir) -> str:
    ends = [e for e in events(run_dir) if e["event"] == "finished"]
    assert ends, events(run_dir)
    return ends[-1]["params_sha256"]


def params(run_dir):
    """Parameters of a run's latest checkpoint, restored in this process (1 device)."""
    from distdeer.eval import load_run

    return load_run(run_dir)[2]


@pytest.fixture(scope="module")
def baseline(cluster, config_file, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "baseline")
    code, out = launch(cluster, config_file, run_dir)
    assert code == 0, out[-4000:]
    return run_dir


def test_two_hosts_match_one_process(cluster, config_file, baseline, tmp_path):
    """The 2-host run agrees with one process of 4 devices.  (That a 2-host run is deterministic, bit for
    bit, is what every fault test below asserts: each interrupted run ends on the baseline's parameters.)"""
    info = hosts(baseline)
    assert [h["rank"] for h in info["hosts"]] == [0, 1]
    assert len({h["node_id"] for h in info["hosts"]}) == 2  # STRICT_SPREAD: one process per node
    assert all(h["pid"] > 0 for h in info["hosts"])
    m = metrics(baseline)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert np.isfinite([r["loss"] for r in m.values()]).all()

    one = str(tmp_path / "one")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-m", "distdeer.cli", "train", config_file, f"run.dir={one}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import jax

    for a, b in zip(jax.tree.leaves(params(baseline)), jax.tree.leaves(params(one))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    m1 = metrics(one)
    np.testing.assert_allclose([m1[s]["loss"] for s in m1], [m[s]["loss"] for s in m1], rtol=1e-4)


def test_sigkill_worker_restarts_group_bitwise(cluster, config_file, baseline, tmp_path):
    run_dir = str(tmp_path / "killed")
    proc = launch(cluster, config_file, run_dir, wait=False)
    wait_for_step(run_dir, 17, proc)
    victim = hosts(run_dir)["hosts"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "restarting the group" in out
    ev = events(run_dir)
    assert [e["event"] for e in ev].count("failure") == 1
    assert victim not in [h["pid"] for h in hosts(run_dir)["hosts"]]  # fresh processes, hosts.json current
    assert hosts(run_dir)["attempt"] == 1
    assert final_sha(run_dir) == final_sha(baseline)


def test_hang_is_caught_by_the_watchdog(cluster, config_file, baseline, tmp_path):
    """A stopped (SIGSTOP) rank leaves the other stuck in a collective: the watchdog turns it into a
    failure within ray.watchdog_s and the group restarts."""
    run_dir = str(tmp_path / "hung")
    # a shorter watchdog than the config's 20 s, so that the wait is short (tiny steps take milliseconds)
    proc = launch(cluster, config_file, run_dir, f"ray.watchdog_s={WATCHDOG_S}", wait=False)
    wait_for_step(run_dir, 17, proc)
    victim = hosts(run_dir)["hosts"][0]["pid"]
    os.kill(victim, signal.SIGSTOP)
    t0 = time.time()
    try:
        while not any(e["event"] == "failure" for e in events(run_dir)):
            assert time.time() - t0 < 60, "watchdog did not fire"
            time.sleep(0.2)
        detected = time.time() - t0
    finally:
        try:
            os.kill(victim, signal.SIGKILL)  # a stopped process may ignore Ray's graceful kill
        except ProcessLookupError:
            pass
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    cause = [e for e in events(run_dir) if e["event"] == "failure"][0]["cause"]
    assert "watchdog" in cause, cause
    assert detected < WATCHDOG_S + 10
    assert final_sha(run_dir) == final_sha(baseline)


def test_node_loss_of_rank0_restarts_and_completes(cluster, config_file, baseline, tmp_path):
    run_dir = str(tmp_path / "nodeloss")
    proc = launch(cluster, config_file, run_dir, wait=False)
    wait_for_step(run_dir, 17, proc)
    node_id = hosts(run_dir)["hosts"][0]["node_id"]
    node = [n for n in cluster.worker_nodes if n.node_id == node_id][0]
    cluster.remove_node(node)
    try:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        assert node_id not in [h["node_id"] for h in hosts(run_dir)["hosts"]]
        assert final_sha(run_dir) == final_sha(baseline)
    finally:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()


def test_budget_exhausted_fails_cleanly_with_cause(cluster, config_file, tmp_path):
    run_dir = str(tmp_path / "budget")
    proc = launch(cluster, config_file, run_dir, "ray.max_failures=0", wait=False)
    wait_for_step(run_dir, 12, proc)
    os.kill(hosts(run_dir)["hosts"][1]["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-4000:]
    line = [ln for ln in out.splitlines() if ln.startswith("distdeer: error:")]
    assert line and "giving up after 1 failures" in line[-1] and "rank 1" in line[-1], out[-3000:]
    assert events(run_dir)[-1]["event"] == "failed"


def _stop_after(cluster, config_file, run_dir, step, devices):
    proc = launch(cluster, config_file, run_dir, devices=devices, wait=False)
    wait_for_step(run_dir, step, proc)
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` does to the entrypoint
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped (signal) at step" in out
    return [e for e in events(run_dir) if e["event"] == "stopped"][-1]["step"]


def test_sigterm_checkpoints_and_elastic_resume_4_2_4(cluster, config_file, baseline, tmp_path):
    """2 hosts × 2 devices → SIGTERM → 2 × 1 → SIGTERM → 2 × 2 to the end.  Every restore is checked
    bitwise against the state_sha256 saved with it (the loop refuses a mismatch), and the loss is
    continuous: each step's loss agrees with the uninterrupted 4-device run."""
    from distdeer.train import checkpoint

    run_dir = str(tmp_path / "elastic")
    first = _stop_after(cluster, config_file, run_dir, 12, devices=2)
    meta = checkpoint.read_meta(os.path.join(run_dir, "checkpoints"), first)
    assert meta["devices"] == 4 and meta["step"] == first
    second = _stop_after(cluster, config_file, run_dir, first + 10, devices=1)
    meta = checkpoint.read_meta(os.path.join(run_dir, "checkpoints"), second)
    assert meta["devices"] == 2 and second > first
    code, out = launch(cluster, config_file, run_dir)
    assert code == 0, out[-4000:]
    m, ref = metrics(run_dir), metrics(baseline)
    assert sorted(m) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([m[s]["loss"] for s in sorted(m)], [ref[s]["loss"] for s in sorted(m)], rtol=2e-3)
    import jax

    for a, b in zip(jax.tree.leaves(params(run_dir)), jax.tree.leaves(params(baseline))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_bad_input_exit_2_nothing_written(cluster, config_file, tmp_path):
    run_dir = tmp_path / "bad"
    code, out = launch(cluster, config_file, str(run_dir), "train.lr=-1")
    assert code == 2 and out.strip().splitlines()[-1].startswith("distdeer: error: train.lr")
    code, out = launch(cluster, config_file, str(run_dir), "data.path=/nonexistent.zarr")
    assert code == 2 and "not found" in out.strip().splitlines()[-1]
    # more hosts than live nodes (STRICT_SPREAD): refused at once, not after ray.startup_s of waiting
    code, out = launch(cluster, config_file, str(run_dir), hosts=5, devices=1)
    assert code == 2 and out.strip().splitlines()[-1].startswith("distdeer: error: cannot place 5 processes"), out
    assert not run_dir.exists()


def test_watchdog_verdicts_by_phase():
    """The supervisor's rule (``group.overdue``): once a rank has compiled its step, the first step gets
    ``watchdog_s`` like any other (a hang there is reported after 300 s, not after the 900 s start-up
    allowance); before that ``startup_s`` counts from the attempt's start; finished ranks are left alone."""
    from distdeer.group import Seen, overdue, waiting

    now, startup, watchdog = 1000.0, 900.0, 300.0
    compiling = Seen(None, "compiling", now - 800)
    assert overdue([compiling, compiling], 850, now, startup, watchdog) is None
    cause = overdue([compiling, Seen()], 901, now, startup, watchdog)
    assert cause.startswith("rank 0 completed no step within ray.startup_s=900 s") and "compiling" in cause
    first = Seen(None, "first step", now - 301)
    cause = overdue([Seen(None, "first step", now - 299), first], 400, now, startup, watchdog)
    assert cause.startswith("rank 1 compiled its step 301 s ago and has not completed it") and "watchdog" in cause
    assert overdue([Seen(None, "first step", now - 299)] * 2, 400, now, startup, watchdog) is None
    # compiled just before the start-up allowance ran out: the first step still gets its watchdog_s
    assert overdue([Seen(None, "first step", now - 100)] * 2, 950, now, startup, watchdog) is None
    stuck = Seen(17, "training", now - 301)
    assert overdue([Seen(20, "training", now - 1), stuck], 5000, now, startup, watchdog).startswith(
        "rank 1 made no progress for 301 s > ray.watchdog_s=300 s")
    assert overdue([stuck._replace(done=True), Seen(60, "training", now)], 5000, now, startup, watchdog) is None
    assert waiting([first, compiling, Seen()], now) == ("rank 0 first step for 301 s, rank 1 compiling for 800 s, "
                                                        "rank 2 not answering")


def test_ray_job_submit_with_token_auth(cluster, config_file, baseline, tmp_path):
    run_dir = str(tmp_path / "job")
    address = "http://" + cluster.head_node.address_info["webui_url"].removeprefix("http://")
    submit = ["ray", "job", "submit", "--address", address, "--", sys.executable, LAUNCH, config_file,
              f"run.dir={run_dir}", "--hosts", "2", "--devices-per-host", "2"]
    refused = subprocess.run(submit, env=dict(os.environ, RAY_AUTH_TOKEN="0" * 32), capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and not os.path.exists(run_dir)
    proc = subprocess.run(submit, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout
    assert final_sha(run_dir) == final_sha(baseline)


def test_scaling_study_places_processes_on_nodes(cluster, tmp_path):
    """launch/scaling.py --ray on the cluster: the 2-process point runs on two nodes (STRICT_SPREAD), the
    1-process point on one; both layouts solve the same problem to the same loss."""
    out = tmp_path / "study"
    study = [sys.executable, os.path.join(ROOT, "launch", "scaling.py"), "--ray", "--T", "257", "--latent", "3",
             "--hidden", "8", "--repeats", "1", "--out", str(out)]
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    # a study with a point no layout of the live nodes can hold is refused before anything runs
    proc = subprocess.run(study + ["--devices", "2,5", "--hosts", "1,5"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and not out.exists(), (proc.stdout + proc.stderr)[-4000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("scaling: error: point hosts=5 devices=5: cannot place"), \
        proc.stderr
    proc = subprocess.run(study + ["--devices", "2", "--hosts", "1,2"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    study = json.loads((out / "scaling.json").read_text())
    assert study["ray_nodes"] >= 3 and study["placement"] == "STRICT_SPREAD"  # live nodes (an earlier test removes one)
    rows = {r["processes"]: r for r in study["rows"]}
    assert sorted(rows) == [1, 2] and all(r["devices"] == 2 and r["converged"] for r in rows.values())
    assert len(rows[1]["nodes"]) == 1 and len(set(rows[2]["nodes"])) == 2
    assert cluster.head_node.node_id not in rows[2]["nodes"]  # the head has no CPUs to give
    assert rows[1]["collective_bytes"] == rows[2]["collective_bytes"] > 0
    assert abs(rows[1]["loss"] - rows[2]["loss"]) <= 1e-5 * abs(rows[1]["loss"])
    assert rows[2]["bptt_value_grad_s"] == rows[1]["bptt_value_grad_s"] > 0  # measured once, copied
    assert (out / "scaling.png").stat().st_size > 10_000
