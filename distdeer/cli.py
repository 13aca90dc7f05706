"""The ``distdeer`` command line.

    distdeer train CONFIG.yaml [dotted.key=value ...]
    distdeer eval RUN_DIR [RUN_DIR ...] [--data TEST] [--select latest|train] [--summary PATH]
    distdeer sweep CONFIG.yaml [overrides] --seeds 0,1,2 [--parallel N]
    distdeer inspect RUN_DIR
    distdeer data generate SYSTEM --steps N [--dt] [--noise] [--dim] [--seed] --out PATH.zarr
    distdeer data import FILE.npy|FILE.csv --out PATH.zarr
    distdeer data embed SERIES --channel C [--lag L --dim M | --like EMBEDDED.zarr] --out PATH.zarr
    distdeer bench solver --T 100000 --latent 3 --hidden 50 [--devices P] [--jacobian dense|diagonal]
                          [--alpha A] [--method blocked|associative] [--repeats R] [--memory-only] [--json PATH]
    distdeer bench gtf --T 10000,100000,1000000 [--alpha 0.1] [--max-iter 50] [--json PATH]
    distdeer bench train --T 100000 --steps 200 [--set KEY=VALUE] [--json PATH]
    distdeer bench train --devices P [--processes K --pin] [--T …] [--steps 6] [--compile-only] [--json PATH]

Bad input is reported in one line on stderr with exit code 2, before anything is computed or written.
"""

from __future__ import annotations

import argparse
import os
import sys


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from distdeer.config import CHOICES
    from distdeer.data import reference

    parser = _Parser(prog="distdeer", description="GTF-DEER: recurrent models trained in parallel over time.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    bench = commands.add_parser("bench", help="benchmarks")
    which = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    s = which.add_parser("solver", help="GTF-DEER vs the sequential recurrence (forward, value+grad)")
    s.add_argument("--T", type=_positive("--T"), default=100_000, help="sequence length")
    s.add_argument("--latent", type=_positive("--latent"), default=3, help="latent units M")
    s.add_argument("--hidden", type=_positive("--hidden"), default=50, help="hidden units L")
    s.add_argument("--devices", type=_positive("--devices"), default=1,
                   help="devices to shard time over (on CPU: simulated devices)")
    s.add_argument("--jacobian", choices=CHOICES["solver.jacobian"], default="dense")
    s.add_argument("--method", choices=("sequential", "blocked", "associative"), default=None,
                   help="local scan (default: sequential on CPU, associative on accelerators)")
    s.add_argument("--alpha", type=float, default=None,
                   help="GTF forcing strength (default: estimated, 1 - 1/geometric-mean Jacobian norm)")
    s.add_argument("--repeats", type=_positive("--repeats"), default=3, help="timed repetitions (best is kept)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--jacobian-source", choices=("analytic", "autodiff"), default="analytic",
                   help="the model's closed-form Jacobians, or none (the solver differentiates the step)")
    s.add_argument("--init", choices=("data", "default"), default="data",
                   help="Newton's initial guess: the forcing states, or the solver's default (z0 repeated)")
    s.add_argument("--adjoint", choices=CHOICES["solver.jacobian"], default=None,
                   help="the adjoint's maps: one dense reverse scan, or matrix-free diagonal sweeps "
                        "(default: the solver's, dense unless T*M^2 > 2^26 after a diagonal solve)")
    s.add_argument("--skip-sequential", action="store_true", help="time DEER only (huge T)")
    s.add_argument("--memory-only", action="store_true",
                   help="only compile and report XLA's memory analysis (nothing is allocated or run)")
    s.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    t = commands.add_parser("train", help="train a model (resumes when the run directory has checkpoints)")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    e = commands.add_parser("eval", help="DSR evaluation of one run, or a summary over several (seeds)")
    e.add_argument("run_dirs", nargs="+")
    e.add_argument("--data", help="test series (.npy/.csv/.zarr); default: the run's eval.data, else "
                   "(generated systems) a fresh trajectory")
    e.add_argument("--select", choices=CHOICES["eval.select"], default=None,
                   help="which checkpoint: the latest, or the retained one closest (D_stsp) to the training "
                   "series (default: the run's eval.select)")
    e.add_argument("--summary", metavar="PATH",
                   help="where the median ± MAD summary of several runs goes (default: <base>-summary.json "
                   "for runs <base>-seed<k>, else summary.json in their common parent directory)")
    sw = commands.add_parser("sweep", help="train one config for several seeds, then summarise (median ± MAD)")
    sw.add_argument("config")
    sw.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    sw.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    sw.add_argument("--parallel", type=_positive("--parallel"), default=1,
                    help="seeds trained at once, each in its own process pinned to its share of the CPUs")
    i = commands.add_parser("inspect", help="print a run directory's state as JSON")
    i.add_argument("run_dir")
    d = commands.add_parser("data", help="generate or import trajectories (tensorstore zarr3)")
    dsub = d.add_subparsers(dest="data", required=True, parser_class=_Parser)
    gen = dsub.add_parser("generate", help="integrate a system")
    gen.add_argument("system", choices=CHOICES["data.system"])
    gen.add_argument("--steps", type=_positive("--steps"), required=True)
    gen.add_argument("--dt", type=float, default=0.01)
    gen.add_argument("--noise", type=float, default=0.0, help="observation noise, fraction of the std")
    gen.add_argument("--dim", type=_positive("--dim"), default=10, help="dimension (lorenz96)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True, help="PATH.zarr")
    imp = dsub.add_parser("import", help="validate and store a .npy/.csv series")
    imp.add_argument("file")
    imp.add_argument("--out", required=True, help="PATH.zarr")
    emb = dsub.add_parser("embed", help="delay-embed one channel of a series (lag by the first minimum of the "
                                        "mutual information, dimension by false nearest neighbours)")
    emb.add_argument("file", help="a .zarr, .npy or .csv series")
    emb.add_argument("--channel", type=int, required=True, help="column to embed (0-based)")
    emb.add_argument("--lag", type=_positive("--lag"), default=None, help="τ in steps (default: by the rule)")
    emb.add_argument("--dim", type=_positive("--dim"), default=None, help="m (default: by the rule)")
    emb.add_argument("--like", metavar="EMBEDDED.zarr", default=None,
                     help="take channel, lag and dimension from a series this command wrote (a test series "
                          "embedded as its training series)")
    emb.add_argument("--out", required=True, help="PATH.zarr")
    fe = dsub.add_parser("fetch", help="download a reference benchmark series (checked by sha256); configs "
                                       "then name its files ref:FILE")
    fe.add_argument("series", choices=sorted(reference.SERIES))
    fe.add_argument("--dir", default=None, help="data directory (default: $DISTDEER_DATA, else "
                                                "~/.cache/distdeer/data)")
    bt = which.add_parser("train", help="training step: GTF-DEER vs GTF-BPTT (one device), or with --devices the "
                          "whole-series step as training compiles it (collective bytes, memory, step time)")
    bt.add_argument("--T", type=_positive("--T"), default=100_000)
    bt.add_argument("--steps", type=_positive("--steps"), default=200,
                    help="training steps timed (default 200; with --devices use a few)")
    bt.add_argument("--devices", type=_positive("--devices"), default=None,
                    help="whole-series step on P devices (on CPU: simulated; all devices of --processes)")
    bt.add_argument("--processes", type=_positive("--processes"), default=1,
                    help="with --devices: jax.distributed processes on this machine sharing the devices")
    bt.add_argument("--pin", action="store_true", help="with --processes: process r on CPU core r")
    bt.add_argument("--compile-only", action="store_true",
                    help="with --devices: only compile and read collective bytes and memory")
    bt.add_argument("--latent", type=_positive("--latent"), default=3)
    bt.add_argument("--hidden", type=_positive("--hidden"), default=50)
    bt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for both runs (repeatable), e.g. gtf.every=1")
    bt.add_argument("--json", metavar="PATH")
    g = which.add_parser("gtf", help="Newton iterations of GTF-DEER vs plain DEER on chaotic Lorenz-63")
    g.add_argument("--T", type=_lengths, default=[10_000, 100_000, 1_000_000],
                   help="comma-separated sequence lengths")
    g.add_argument("--alpha", type=float, default=0.1)
    g.add_argument("--max-iter", type=_positive("--max-iter"), default=50)
    g.add_argument("--run", metavar="RUN_DIR", help="a trained model (a run on a generated system) instead of the "
                   "Euler map; GTF uses the adaptive estimate of α on the data")
    g.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    return parser


def _seeds(text):
    try:
        seeds = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds must list distinct seeds, got {text!r}")
    return seeds


def _lengths(text):
    try:
        values = [int(float(v)) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--T must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--T must list lengths >= 1, got {text!r}")
    return values


def _check_output(path: str | None) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--json: directory {parent} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"--json: {path} is a directory")


def _bench_solver(args) -> int:
    _check_output(args.json)
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha}")
    import jax

    if args.devices > 1:
        # Simulated CPU devices (used when no accelerator is present) must be requested before JAX
        # initialises its backends; on a GPU machine this only sizes the unused CPU backend.
        jax.config.update("jax_num_cpu_devices", args.devices)
    from distdeer.bench import solver

    cfg = solver.SolverBench(T=args.T, latent=args.latent, hidden=args.hidden, devices=args.devices,
                             jacobian=args.jacobian, alpha=args.alpha, repeats=args.repeats, seed=args.seed,
                             method=args.method, skip_sequential=args.skip_sequential,
                             memory_only=args.memory_only, jacobian_source=args.jacobian_source, init=args.init,
                             adjoint=args.adjoint)
    try:
        res = solver.run(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(solver.report(res))
    if args.json:
        solver.write_json(res, args.json)
    return 0


def _bench_gtf(args) -> int:
    _check_output(args.json)
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must lie in [0, 1], got {args.alpha}")
    import json

    from distdeer.bench import chaos

    if args.run is not None:
        if not os.path.isdir(args.run):
            raise UsageError(f"--run {args.run}: not a directory")
        rows = chaos.run_trained(args.run, args.T, max_iter=args.max_iter)
    else:
        rows = chaos.run(args.T, alpha=args.alpha, max_iter=args.max_iter)
    print(chaos.report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _bench_train(args) -> int:
    _check_output(args.json)
    import json

    from distdeer.bench import train as bench_train

    if args.devices is None and (args.processes > 1 or args.pin or args.compile_only):
        raise UsageError("--processes, --pin and --compile-only go with --devices")
    try:
        if args.devices is None:
            res = bench_train.run(args.T, args.steps, args.latent, args.hidden, overrides=args.overrides)
        elif args.processes > 1:
            res = bench_train.in_processes(args.processes, args.pin, args.T, args.devices, args.steps, args.latent,
                                           args.hidden, args.overrides, args.compile_only)
        else:
            import jax

            jax.config.update("jax_num_cpu_devices", args.devices)  # simulated CPU devices (before JAX starts)
            res = bench_train.sharded(args.T, args.devices, args.steps, args.latent, args.hidden, args.overrides,
                                      args.compile_only)
    except (*_user_errors(), ValueError) as e:
        raise UsageError(str(e)) from None
    print(bench_train.report(res) if args.devices is None else bench_train.report_sharded(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def _user_errors():
    """Exceptions that mean bad input (reported in one line, exit 2)."""
    from distdeer.config import ConfigError
    from distdeer.data.store import DataError
    from distdeer.train.checkpoint import CheckpointError

    return ConfigError, DataError, CheckpointError


def _train(args) -> int:
    from distdeer import config, run
    from distdeer.train import loop

    try:
        cfg = config.load(args.config, args.overrides)
        summary = run.train(cfg)
    except _user_errors() as e:
        raise UsageError(str(e)) from None
    except loop.TooManySkipped as e:
        print(f"distdeer: training failed: {e}", file=sys.stderr)
        return 1
    run.print_outcome(summary)
    return 0


def _eval(args) -> int:
    from distdeer import eval as eval_mod

    _check_output(args.summary)
    try:
        results = [eval_mod.evaluate(d, args.data, select=args.select) for d in args.run_dirs]
    except (*_user_errors(), eval_mod.EvalError) as e:
        raise UsageError(str(e)) from None
    for r in results:
        print(f"{r['run_dir']}: {eval_mod.headline(r)}")
    if len(results) > 1:
        try:
            eval_mod.write_summary(results, args.summary)
        except eval_mod.EvalError as e:
            raise UsageError(str(e)) from None
    return 0


def _sweep(args) -> int:
    from distdeer import eval as eval_mod
    from distdeer import sweep

    try:
        return sweep.sweep(args.config, args.overrides, args.seeds, args.parallel)
    except (*_user_errors(), eval_mod.EvalError, sweep.SweepError) as e:
        raise UsageError(str(e)) from None


def _inspect(args) -> int:
    import json

    from distdeer.train import loop

    try:
        print(json.dumps(loop.inspect(args.run_dir), indent=2))
    except _user_errors() as e:
        raise UsageError(str(e)) from None
    return 0


def _fetch(args) -> int:
    from distdeer.data import reference

    try:
        paths = reference.fetch(args.series, args.dir)
    except _user_errors() as e:
        raise UsageError(str(e)) from None
    for f, path in zip(reference.SERIES[args.series], paths):
        print(f"distdeer: {path}  ({f.what}; name it ref:{f.name})")
    return 0


def _data(args) -> int:
    import numpy as np

    from distdeer.data import store, systems

    if args.data == "fetch":
        return _fetch(args)
    if os.path.exists(args.out):
        raise UsageError(f"--out {args.out} already exists")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out: directory {parent} does not exist")
    if not args.out.rstrip("/").endswith(".zarr"):
        raise UsageError("--out must name a .zarr path")
    try:
        if args.data == "generate":
            if args.dt <= 0 or args.noise < 0:
                raise UsageError("--dt must be > 0 and --noise >= 0")
            raw = np.asarray(systems.generate(args.system, args.steps, args.dt, args.noise, args.seed, args.dim),
                             np.float64)
            attrs = {"system": args.system, "dt": args.dt, "noise": args.noise, "seed": args.seed}
        elif args.data == "embed":
            raw, attrs = _embedded(args)
        else:
            raw = store.read_raw(args.file)
            attrs = {"source": os.path.abspath(args.file)}
        z, mean, std = store.standardise(store.check_series(raw, args.out))
        store.write(args.out, z, mean=mean, std=std, attrs=attrs)
    except (ValueError,) as e:
        raise UsageError(str(e)) from None
    extra = f" (delay embedding: lag {attrs['embedding']['lag']}, dim {attrs['embedding']['dim']})" \
        if "embedding" in attrs else ""
    print(f"distdeer: wrote {z.shape[0]} x {z.shape[1]} standardised series to {args.out}{extra}")
    return 0


def _embedded(args):
    """The delay embedding of ``args.file``'s channel and the attributes that record it (data.embed)."""
    import numpy as np

    from distdeer.data import embed, store

    if not os.path.exists(args.file):
        raise UsageError(f"{args.file} not found")
    source = store.read_data_units(args.file)
    attrs = store.attributes(store.open_series(args.file)) if args.file.rstrip("/").endswith(".zarr") else {}
    channel, lag, dim = args.channel, args.lag, args.dim
    if args.like is not None:
        if lag is not None or dim is not None:
            raise UsageError("--like sets the lag and dimension: drop --lag/--dim")
        like = store.attributes(store.open_series(args.like)).get("embedding")
        if like is None:
            raise UsageError(f"--like {args.like}: not a series written by `distdeer data embed`")
        if like["channel"] != channel:
            raise UsageError(f"--like {args.like} embeds channel {like['channel']}, not --channel {channel}")
        lag, dim = like["lag"], like["dim"]
    if not 0 <= channel < source.shape[1]:
        raise UsageError(f"--channel {channel}: the series has channels 0..{source.shape[1] - 1}")
    s = source[:, channel]
    record = {"channel": channel, "rule": "lag: first minimum of the mutual information; dim: false nearest "
                                          "neighbours below 1 % or on a plateau (distdeer/data/embed.py)"}
    if lag is None:
        lag, curve = embed.choose_lag(s)
        record["mutual_information"] = [round(v, 5) for v in curve]
    if dim is None:
        dim, fractions = embed.choose_dim(s, lag)
        record["false_neighbours"] = [round(v, 5) for v in fractions]
    keep = {k: attrs[k] for k in ("system", "dt", "noise", "seed") if k in attrs}
    return np.asarray(embed.delay_embed(s, lag, dim)), {**keep, "embedding": {**record, "lag": lag, "dim": dim}}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "bench" and args.bench == "solver":
            return _bench_solver(args)
        if args.command == "bench" and args.bench == "gtf":
            return _bench_gtf(args)
        if args.command == "bench" and args.bench == "train":
            return _bench_train(args)
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "data":
            return _data(args)
        raise UsageError(f"unknown command {args.command}")
    except UsageError as e:
        print(f"distdeer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
