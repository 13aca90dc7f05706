"""The ``distdeer`` command line.

    distdeer bench solver --T 100000 --latent 3 --hidden 50 [--devices P] [--jacobian dense|diagonal]
                          [--alpha A] [--method blocked|associative] [--repeats R] [--json PATH]

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
    s.add_argument("--jacobian", choices=("dense", "diagonal"), default="dense")
    s.add_argument("--method", choices=("blocked", "associative"), default=None,
                   help="local scan (default: blocked on CPU, associative on accelerators)")
    s.add_argument("--alpha", type=float, default=None,
                   help="GTF forcing strength (default: estimated, 1 - 1/geometric-mean Jacobian norm)")
    s.add_argument("--repeats", type=_positive("--repeats"), default=3, help="timed repetitions (best is kept)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--skip-sequential", action="store_true", help="time DEER only (huge T)")
    s.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    return parser


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
                             method=args.method, skip_sequential=args.skip_sequential)
    try:
        res = solver.run(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(solver.report(res))
    if args.json:
        solver.write_json(res, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "bench" and args.bench == "solver":
            return _bench_solver(args)
        raise UsageError(f"unknown command {args.command}")
    except UsageError as e:
        print(f"distdeer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
