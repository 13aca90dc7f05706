"""A local multi-node Ray cluster on one machine, for trying multi-host runs and failures.

    python cluster/local_cluster.py [--nodes 3] [--cpus-per-node 1] [--dashboard-port 8265]

A head without CPUs (it runs Ray's services and job drivers) and ``--nodes`` worker nodes (separate
raylets, as ``ray.cluster_utils.Cluster`` starts them — the same as the test suite uses).  Token
authentication stays on: the token is read from ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token`` (generated
there if missing, as ``ray start`` does); the dashboard binds to 127.0.0.1 only.  Once a trivial job has
been accepted and run (Ray's job server refuses jobs for a while after start-up), it prints the
commands to submit a job, then waits; Ctrl-C stops the cluster.  A node can be removed to simulate its
loss by typing its number and Enter.
"""

import argparse
import os
import sys
import time

from distdeer.distributed import free_port

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def wait_for_job_server(address: str, timeout_s: float = 300.0) -> None:
    """Return once ``ray job submit`` works: a trivial job is accepted and has run.  For a while after the
    nodes are up, Ray's job server answers "No available agent to submit job, please try again later"."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = JobSubmissionClient(address)
            job = client.submit_job(entrypoint="true", submission_id=f"local-cluster-ready-{os.getpid()}")
            break
        except Exception as e:  # the server's "try again later", or not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job server at {address} accepted no job within {timeout_s:g} s: {e}")
            time.sleep(1.0)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the readiness job on {address} did not finish within {timeout_s:g} s")
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--dashboard-port", type=int, default=8265)
    args = ap.parse_args()
    token_file = os.path.expanduser("~/.ray/auth_token")
    if "RAY_AUTH_TOKEN" not in os.environ:
        if not os.path.exists(token_file):
            import secrets

            os.makedirs(os.path.dirname(token_file), exist_ok=True)
            with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(secrets.token_hex(32))
        with open(token_file) as f:
            os.environ["RAY_AUTH_TOKEN"] = f.read().strip()
    from ray.cluster_utils import Cluster

    # Every node's dashboard agent gets a port of its own: Ray's default (52365) is one per machine, and the
    # job server needs the head's agent — a second cluster on the machine (or the test suite's) would
    # otherwise refuse every job ("No available agent to submit job").
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": args.dashboard_port, "dashboard_agent_listen_port": free_port()})
    nodes = [cluster.add_node(num_cpus=args.cpus_per_node, dashboard_agent_listen_port=free_port())
             for _ in range(args.nodes)]
    cluster.wait_for_nodes()
    wait_for_job_server(f"http://127.0.0.1:{args.dashboard_port}")
    print(f"""Ray cluster up: {args.nodes} nodes.  In another shell:
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat {token_file})   # or the token you set
  ray job submit --address http://127.0.0.1:{args.dashboard_port} --submission-id l63-a --no-wait \\
      --runtime-env-json '{{"env_vars": {{"RAY_JOB_STOP_WAIT_TIME_S": "600"}}}}' -- python $PWD/launch/train.py \\
      $PWD/configs/lorenz63.yaml run.dir=$PWD/runs/l63-2hosts --hosts 2 --devices-per-host 2
  (docs/cluster.md: logs, stop, resume)
  RAY_ADDRESS={cluster.address} python launch/train.py ...      # or drive it directly
Type a node number (1..{args.nodes}) and Enter to remove that node; Ctrl-C to stop.""", flush=True)
    try:
        for line in sys.stdin:
            if line.strip().isdigit() and 1 <= int(line) <= len(nodes) and nodes[int(line) - 1] is not None:
                cluster.remove_node(nodes[int(line) - 1])
                nodes[int(line) - 1] = None
                print(f"node {line.strip()} removed", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
