"""A run from configuration to report: train → select the checkpoint → evaluate → report.

The one orchestrator of ``distdeer train``, ``distdeer sweep`` and ``launch/train.py``.  Training
(``distdeer.train.loop.run``, in every process of a group) knows nothing of evaluation; what follows it
runs in one process: the one that trained, or the launcher once a group's workers have exited.

* ``train(cfg)``: train or resume, then ``finish``; returns the run's summary.
* ``finish(cfg, control)``: after a run that reached its last step — the loss figure, and (``eval.at_end``)
  the evaluation of the checkpoint ``eval.select`` picks (``distdeer.eval``: the latest, or the retained
  one closest to the training series).  SIGTERM/SIGINT during the evaluation abandons it at once (the
  trained run is complete and checkpointed; eval.json is written last and atomically), and the run ends
  as finished; ``distdeer eval RUN_DIR`` or a rerun of the sweep evaluates it.
* ``evaluation_of(cfg)``: a finished run's evaluation, reusing its eval.json where it is current (sweeps).
* ``print_outcome(summary)``: the lines a run ends with.
"""

from __future__ import annotations

import json
import os
import signal

from distdeer import eval as eval_mod
from distdeer import plots
from distdeer.config import Config
from distdeer.train import loop

RESULT_FILES = ("eval.json", "attractor.png", "spectrum.png", "timeseries.png", "slow.png", "generated.npy", "loss.png",
                "metrics.jsonl", "checkpoints/")


class EvaluationInterrupted(Exception):
    """SIGTERM/SIGINT arrived during the evaluation that follows training."""


def _interrupt_evaluation(signum, frame):
    raise EvaluationInterrupted(signal.Signals(signum).name)


def wants_eval(cfg: Config) -> bool:
    """Evaluate at the end? (Generated data has a natural test series; a file needs ``eval.data``.)"""
    return cfg.eval.at_end and (cfg.data.path is None or cfg.eval.data is not None)


def finish(cfg: Config, control: loop.Control | None = None) -> tuple[dict | None, bool]:
    """After a run that reached its last step: loss figure and evaluation → (evaluation or None,
    interrupted).  ``control``: the training's handle, whose stop flag a signal during the last
    checkpoint's commit has already set."""
    plots.loss_figure(os.path.join(cfg.run.dir, "metrics.jsonl"), os.path.join(cfg.run.dir, "loss.png"))
    if not wants_eval(cfg):
        return None, False
    if control is not None and control.stop_requested:
        return None, True
    try:
        with loop.on_signals(_interrupt_evaluation):
            return eval_mod.evaluate(cfg.run.dir, cfg.eval.data), False
    except EvaluationInterrupted:
        return None, True


def train(cfg: Config, control: loop.Control | None = None) -> dict:
    """Train (or resume) the configured run in this process, then ``finish`` it; the run's summary."""
    control = control or loop.Control()
    summary = loop.run(cfg, control)
    evaluation, interrupted = (None, False) if summary["stopped"] else finish(cfg, control)
    return {**summary, "eval": evaluation, "eval_interrupted": interrupted}


def evaluation_of(cfg: Config) -> dict | None:
    """The finished run's evaluation: its eval.json when it was made after the final step with the run's
    checkpoint selection (``eval.select: train`` may evaluate an earlier checkpoint than the final one),
    else computed now; None when the run did not reach its last step (stopped)."""
    step = loop.inspect(cfg.run.dir)["step"]
    if step != cfg.train.steps:
        return None
    path = os.path.join(cfg.run.dir, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
        # eval.json files written before latest_step existed evaluated the latest checkpoint
        made_after = res.get("latest_step", res.get("step"))
        if made_after == step and res.get("checkpoint", {}).get("select", "latest") == cfg.eval.select:
            return res
    return eval_mod.evaluate(cfg.run.dir, cfg.eval.data)


def print_outcome(summary: dict) -> None:
    """The lines a finished or stopped training run ends with (its evaluation, where its results are)."""
    where = os.path.abspath(summary["run_dir"])
    state = "stopped (signal) at" if summary["stopped"] else "finished at"
    ev = summary.get("eval")
    if ev:
        print(f"distdeer: evaluation: {eval_mod.headline(ev)}")
    if summary.get("eval_interrupted"):
        print(f"distdeer: evaluation interrupted (signal); `distdeer eval {where}` evaluates the trained run")
    # Name only what is there: without an evaluation there are no figures nor eval.json.
    present = [name for name in RESULT_FILES if os.path.exists(os.path.join(where, name.rstrip("/")))]
    print(f"distdeer: {state} step {summary['step']}; results in {where} ({', '.join(present)}); "
          f"params sha256 {summary['params_sha256'][:16]}…", flush=True)
