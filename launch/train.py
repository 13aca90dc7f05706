"""``ray job submit`` entrypoint: train one run on N hosts (one JAX process each) with group restarts.

    python launch/train.py CONFIG.yaml [dotted.key=value ...] --hosts N [--devices-per-host K]

``--hosts``/``--devices-per-host`` only set ``mesh.hosts``/``mesh.devices_per_host``: the config stays
the one source of truth (and is what the run directory records).  With ``RAY_ADDRESS`` set (as
``ray job submit`` does) it joins that cluster; otherwise it starts a local Ray and runs the N
processes on this machine (placement PACK).  Exit codes: 0 finished or stopped with a checkpoint,
1 the restart budget (``ray.max_failures``) is spent, 2 bad input (one line, nothing written).
See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import warnings
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--hosts", type=int, default=None, help="JAX processes, one per host (mesh.hosts)")
    p.add_argument("--devices-per-host", type=int, default=None,
                   help="devices per process (mesh.devices_per_host); on CPU, simulated XLA devices")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.hosts is not None:
        overrides.append(f"mesh.hosts={args.hosts}")
    if args.devices_per_host is not None:
        overrides.append(f"mesh.devices_per_host={args.devices_per_host}")

    from distdeer import config
    from distdeer.config import ConfigError
    from distdeer.data.store import DataError
    from distdeer.train import loop

    try:
        cfg = config.load(args.config, overrides)
        # Workers run elsewhere (another cwd, another node): every path they use is made absolute.
        cfg.run.dir = os.path.abspath(cfg.run.dir)
        for section, key in (("data", "path"), ("eval", "data"), ("checkpoint", "dir")):
            value = getattr(getattr(cfg, section), key)
            if value is not None and "://" not in value:
                setattr(getattr(cfg, section), key, os.path.abspath(value))
        source, _, _ = loop.prepare(cfg, read=False)
    except (ConfigError, DataError) as e:
        print(f"distdeer: error: {e}", file=sys.stderr)
        return 2

    # Ray starts its processes with fork+exec; JAX's warning about fork does not apply to exec.
    warnings.filterwarnings("ignore", message="os.fork\\(\\) was called", category=RuntimeWarning)
    from distdeer import group

    cfg.ray.placement = group.connect(cfg.mesh.hosts, cfg.ray.cpus_per_host, cfg.ray.placement)
    if cfg.ray.check_placement:
        bundle, _ = group.host_resources(cfg.mesh.devices_per_host, cfg.ray.cpus_per_host)
        problem = group.unplaceable(cfg.mesh.hosts, bundle, cfg.ray.placement)
        if problem:
            print(f"distdeer: error: {problem} (mesh.hosts, --devices-per-host, ray.placement)", file=sys.stderr)
            return 2
    loop.start_run_dir(cfg, source.info)
    supervisor = group.Supervisor(cfg)
    supervisor.install_signal_handlers()
    code = supervisor.run()
    if code == 0 and not supervisor.stop_requested.is_set():
        from distdeer import eval as eval_mod
        from distdeer import run

        ev, interrupted = run.finish(cfg)
        if ev:
            print(f"distdeer: evaluation: {eval_mod.headline(ev)}")
        if interrupted:
            print(f"distdeer: evaluation interrupted (signal); `distdeer eval {cfg.run.dir}` evaluates the run")
    return code


if __name__ == "__main__":
    sys.exit(main())
