"""Typed run configuration: nested dataclasses that the YAML file mirrors key for key.

``load(path, overrides)`` reads a YAML file, applies ``dotted.key=value`` overrides (values parsed as
YAML), and rejects unknown keys and wrong types with a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

import yaml


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration that cannot be used (unknown key, wrong type, bad value)."""


# The allowed values of every field with a fixed set of them, stated once: validation, the CLI's choices
# and its help read them from here (``CHOICES``).
System = Literal["lorenz63", "rossler", "lorenz96", "slowfast", "slowfast_drive", "hindmarsh_rose"]
ModelKind = Literal["shplrnn", "clipped_shplrnn", "alrnn", "plrnn", "lru", "custom"]
Block = Literal["glu", "mlp"]
Readout = Literal["identity", "affine"]
Decay = Literal["linear", "exp"]
GTFMode = Literal["adaptive", "constant"]
NormKind = Literal["max", "geometric", "mean"]
SolverKind = Literal["deer", "sequential", "scan"]
Jacobian = Literal["dense", "diagonal"]
Placement = Literal["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"]
Selection = Literal["latest", "train"]


@dataclasses.dataclass
class RunConfig:
    dir: str = "runs/lorenz63"  # run directory: config.yaml, checkpoints, metrics.jsonl, events.jsonl, eval.json


GENERATOR_DT = 0.01  # integration step of the built-in systems unless data.dt says otherwise


@dataclasses.dataclass
class DataConfig:
    path: str | None = None  # .zarr, .npy or .csv; ref:FILE a fetched reference series; None: generate `system`
    system: System = "lorenz63"  # generator used when path is None
    steps: int = 100_000  # rows of a generated series (T + 1: x_0 … x_T)
    # Sampling interval in time units per step. None: GENERATOR_DT for a generated system, else the
    # series' own `dt` attribute (files written by `distdeer data generate`), else unknown — then the
    # model's Lyapunov exponent is reported per step only.
    dt: float | None = None
    noise: float = 0.05  # observation noise of a generated series, fraction of each dimension's std
    seed: int = 0  # seed of a generated series


@dataclasses.dataclass
class ModelConfig:
    # the latent map F (design §2.1); lru: a Linear Recurrent Unit stack (keys state … block below; latent,
    # nonlinear, readout and unforced_init do not apply to it); custom: your own, from model.factory
    kind: ModelKind = "clipped_shplrnn"
    # kind custom: "package.module:function" (importable from the working directory or the environment);
    # function(latent=M, hidden=L) returns {"init": key -> params, "step": (params, z) -> z, optionally
    # "jac": (params, z) -> (M, M) and "jac_diag": (params, z) -> (M,)}; without them Jacobians by autodiff
    factory: str | None = None
    latent: int = 3  # M (an LRU's state is derived: N + 2 · layers · state real units)
    hidden: int = 50  # L (shPLRNN family); lru: the width of the residual stream and of each layer's block
    nonlinear: int = 2  # P (ALRNN): units passed through the ReLU
    readout: Readout = "identity"  # identity (the first N units are observed) or affine (x = B z + b)
    # identity readout with M > N: the unforced units' rows of the map's weights (W1, or W) start scaled by
    # this, so their Jacobian block starts near diag(a) — contractive.  GTF does not damp those units, and
    # whole-series DEER converges slowly while they are expansive (docs/results.md, slow–fast)
    unforced_init: float = 1.0
    # identity readout with M > N: the unforced units' linear weights a start at 1 − 1/τ, τ log-spaced from 10
    # to this many steps — memories up to a slow scale, instead of the default a ≈ 0.9 (a memory of ~10
    # steps, through which no gradient reaches a dependence thousands of steps long).  None: the default.
    # Measured on the slow–fast system: training shortens them to 10–35 steps within 1500 updates
    # (docs/results.md, "Long time scales: where the whole series wins")
    unforced_timescale: float | None = None
    # identity readout with M > N, PLRNN family: how the unforced units' linear weights are parametrised.
    # linear: a itself; exp: a = exp(−exp ν) with ν the parameter (key "nu" of the map's parameters, "a"
    # then holds the forced units' weights only).  Under exp every a lies in (0, 1) and an optimiser step
    # scales a unit's memory −1/log a by a factor instead of moving a by an amount: a slow unit (1 − a ≈ 10^-3)
    # is not pushed past 1, where over a whole series of 10^5 steps its state overflows
    unforced_decay: Decay = "linear"
    # kind lru: complex recurrent units per layer, and layers (each followed by a residual block)
    state: int = 16
    layers: int = 1
    # kind lru: the moduli |λ| of the recurrence's eigenvalues start uniform (by area) in [r_min, r_max];
    # 1 − r_max sets the slowest time scale the untrained model holds (about 1/(1 − r_max) steps)
    r_min: float = 0.4
    r_max: float = 0.99
    max_phase: float = 0.6283  # kind lru: arg λ starts uniform in [0, max_phase] (radians per step)
    block: Block = "glu"  # kind lru: the position-wise block after each layer, GLU or MLP (width model.hidden)


@dataclasses.dataclass
class GTFConfig:
    mode: GTFMode = "adaptive"  # adaptive: α = max(0, 1 − 1/𝒩) re-estimated (design §2.2); constant: α fixed
    alpha: float = 1.0  # constant α, or the starting α of the adaptive schedule
    # max: per window the geometric mean of ‖J_t‖ over time, then the maximum over the batch (the reference
    # "product upper bound"); geometric: one geometric mean over every forced state of the step (the same
    # for a single series, lower on a batch of windows); mean: the arithmetic mean.
    norm: NormKind = "max"
    every: int = 5  # re-estimate α every k steps
    decay: float = 0.1  # α decays with time constant decay × train.steps (γ derived from it)
    # adaptive: α never decays below this floor (0: no floor).  Where the model is contractive along its forced
    # trajectory the estimate is 0 and α would follow the schedule towards 0, the loss becoming a free run's.
    alpha_min: float = 0.0
    sample: int = 4096  # time points used for the Jacobian-norm estimate


@dataclasses.dataclass
class SolverConfig:
    # deer (GTF-DEER); sequential (GTF-BPTT through lax.scan: the baseline); scan (model.kind lru at
    # gtf.alpha 1, constant: teacher forcing makes its recurrence linear, solved exactly by one parallel scan)
    kind: SolverKind = "deer"
    jacobian: Jacobian = "dense"  # dense: Newton (O(M³) per step); diagonal: quasi-DEER (O(M) per step)
    max_iter: int = 50  # Newton iterations per solve before it counts as failed
    fallback: bool = True  # finish a failed Newton solve sequentially (exact) instead of skipping the step
    # The gradient's reverse recurrence: dense (one reverse scan of dense maps) or diagonal (matrix-free
    # sweeps, O(T·M) memory, iterated); null: dense, unless after a diagonal solve T·M² > 2^26 floats.
    adjoint: Jacobian | None = None
    # Steps per chunk when the step, its Jacobians and VJPs are evaluated over a device's slice: bounds
    # the step's intermediates (hidden activations, chunk × L floats) alive at once.
    chunk: int = 2 ** 18


@dataclasses.dataclass
class TrainConfig:
    steps: int = 2000  # parameter updates
    seq_len: int | None = None  # None: the whole series (sharded over "time"); else windows of this length
    batch: int = 16  # windows per step (window mode)
    carry: bool = False  # window mode: streams of consecutive windows, each starting from the last one's end state
    # random windows: steps run forced, without loss or gradient, before each window; its state at their end
    # starts the window (instead of the readout's guess from one observation).  0: none
    burn_in: int = 0
    noise: float = 0.0  # sd of Gaussian noise on the forcing observations (standardised units); targets stay clean
    lr: float = 1e-3  # RAdam learning rate at the start
    lr_end: float = 1e-6  # exponential decay from lr to lr_end over `steps`
    clip: float = 10.0  # global-norm clipping; 0 disables
    lambda_lat: float = 1e-5  # weight of the latent regulariser λ (‖1 − a‖² + Σ ‖weights‖²)
    log_every: int = 10  # steps between rows of metrics.jsonl
    # updates skipped (failed Newton solve or non-finite gradient) that a run tolerates, as a fraction of
    # `steps`; past it the run saves and stops with exit 1 (checked every log_every steps)
    max_skipped: float = 0.05


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 200  # steps between checkpoints (and one at the end or on a signal)
    keep: int = 3  # complete checkpoints retained
    dir: str | None = None  # None: RUN_DIR/checkpoints; multi-host: a path every host sees (or gs://, s3://)


@dataclasses.dataclass
class MeshConfig:
    devices: int | None = None  # None: all devices (of all processes)
    hosts: int = 1  # JAX processes, one per host (launch/train.py --hosts sets it)
    devices_per_host: int | None = None  # None: all of a host's accelerators; on CPU: simulated devices


@dataclasses.dataclass
class RayConfig:
    """Used by launch/train.py only (not part of a run's identity)."""

    max_failures: int = 3  # group restarts after worker failures before the job fails
    watchdog_s: float = 300.0  # a step (the first one too, once compiled) longer than this on any rank is a hang
    startup_s: float = 900.0  # allowance for placing the group, starting JAX, loading data and compiling
    placement: Placement = "STRICT_SPREAD"  # one process per node; PACK to let a small cluster share nodes
    cpus_per_host: float = 1.0  # CPUs reserved per worker process
    # refuse at launch a group the cluster's live nodes can never hold (false on an autoscaling cluster)
    check_placement: bool = True


@dataclasses.dataclass
class EvalConfig:
    at_end: bool = True  # evaluate (distdeer eval) when training finishes
    # which checkpoint is evaluated: "latest", or "train" — among the retained ones (checkpoint.keep), the one
    # whose free run has the lowest D_stsp against the training series (the test data are never looked at)
    select: Selection = "latest"
    data: str | None = None  # test series; None: a fresh trajectory of a generated system
    test_steps: int | None = None  # length of that fresh trajectory; None: data.steps
    # the data system's largest Lyapunov exponent per time unit, when known (eval.json compares the model's
    # with it); None: the literature value for a generated system (data.system or a generated .zarr)
    lyapunov_reference: float | None = None
    # D_slow (metrics.slow_scale_distance): the slow envelope's spectra, per-block mean and spread over blocks
    # of this many steps — about a tenth to a twentieth of the slow period, and several fast periods; the test
    # series should hold >= 10 slow periods.  None: not measured
    slow_block: int | None = None
    slow_sigma: float = 1.0  # D_slow's spectral smoothing, in frequency bins


@dataclasses.dataclass
class Config:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    seed: int = 0  # parameter initialisation and every training random draw (with the step)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    gtf: GTFConfig = dataclasses.field(default_factory=GTFConfig)
    solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def _choices(cls, prefix: str = "") -> dict[str, tuple]:
    """``{"section.key": allowed values}`` for every Literal-typed field of the config dataclasses."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_choices(tp, f"{prefix}{name}."))
        elif typing.get_origin(tp) is Literal:
            out[prefix + name] = typing.get_args(tp)
    return out


CHOICES = _choices(Config)
POSITIVE = ("data.steps", "data.dt", "model.latent", "model.hidden", "gtf.every", "gtf.decay", "gtf.sample",
            "solver.max_iter", "solver.chunk", "model.state", "model.layers", "model.max_phase", "train.steps", "train.batch", "train.lr", "train.lr_end", "train.log_every",
            "checkpoint.every", "checkpoint.keep", "train.seq_len", "mesh.devices",
            "mesh.hosts", "mesh.devices_per_host", "ray.watchdog_s", "ray.startup_s", "ray.cpus_per_host",
            "eval.slow_block", "eval.slow_sigma", "eval.test_steps", "model.unforced_timescale")
NON_NEGATIVE = ("data.noise", "model.nonlinear", "model.unforced_init", "train.clip", "train.lambda_lat", "train.noise", "train.burn_in",
                "ray.max_failures")


def _check_type(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(typing.get_args(tp))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-3" as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")


def _name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else tp.__name__


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, value, tp)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def validate(cfg: Config) -> Config:
    """Value checks that types cannot express; a generated system without ``data.dt`` gets GENERATOR_DT."""
    flat = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {flat[key]!r}")
    for key in POSITIVE:
        if flat[key] is not None and flat[key] <= 0:
            raise ConfigError(f"{key}: must be > 0, got {flat[key]}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]}")
    if not 0.0 <= cfg.train.max_skipped <= 1.0:
        raise ConfigError(f"train.max_skipped: must lie in [0, 1], got {cfg.train.max_skipped}")
    if not 0.0 <= cfg.gtf.alpha <= 1.0:
        raise ConfigError(f"gtf.alpha: must lie in [0, 1], got {cfg.gtf.alpha}")
    if cfg.gtf.alpha_min != 0.0 and (cfg.gtf.mode != "adaptive" or not 0.0 < cfg.gtf.alpha_min <= cfg.gtf.alpha):
        raise ConfigError(f"gtf.alpha_min: a floor in (0, gtf.alpha] for gtf.mode adaptive, got {cfg.gtf.alpha_min}"
                          f" with gtf.mode {cfg.gtf.mode} and gtf.alpha {cfg.gtf.alpha}")
    if cfg.train.lr_end > cfg.train.lr:
        raise ConfigError(f"train.lr_end ({cfg.train.lr_end}) must not exceed train.lr ({cfg.train.lr})")
    if (cfg.model.kind == "custom") != (cfg.model.factory is not None):
        raise ConfigError("model.factory: set it (package.module:function) exactly when model.kind is custom")
    if cfg.model.kind == "alrnn" and cfg.model.nonlinear > cfg.model.latent:
        raise ConfigError(f"model.nonlinear ({cfg.model.nonlinear}) exceeds model.latent ({cfg.model.latent})")
    if cfg.model.unforced_timescale is not None and (cfg.model.unforced_timescale < 10
                                                     or cfg.model.kind in ("lru", "custom")
                                                     or cfg.model.readout != "identity"):
        raise ConfigError(f"model.unforced_timescale: a time scale >= 10 steps for the unforced units of a PLRNN-"
                          f"family model with an identity readout, got {cfg.model.unforced_timescale} "
                          f"({cfg.model.kind}, readout {cfg.model.readout})")
    if cfg.model.unforced_decay == "exp" and (cfg.model.kind in ("lru", "custom") or cfg.model.readout != "identity"):
        raise ConfigError(f"model.unforced_decay: exp applies to the unforced units of a PLRNN-family model with an "
                          f"identity readout, got {cfg.model.kind}, readout {cfg.model.readout}")
    if cfg.model.kind == "lru":
        if not 0.0 <= cfg.model.r_min < cfg.model.r_max < 1.0:
            raise ConfigError(f"model.r_min, model.r_max: need 0 <= r_min < r_max < 1, got {cfg.model.r_min}, "
                              f"{cfg.model.r_max}")
        if cfg.gtf.mode == "adaptive":
            raise ConfigError("gtf.mode: adaptive GTF's Jacobian-norm rule does not apply to model.kind lru; "
                              "use gtf.mode constant (alpha 1: teacher forcing)")
        if cfg.model.readout != "identity":
            raise ConfigError("model.readout: an lru model has its own readout; leave readout identity")
    if cfg.solver.kind == "scan" and (cfg.model.kind != "lru" or cfg.gtf.mode != "constant" or cfg.gtf.alpha != 1.0):
        raise ConfigError("solver.kind scan: needs model.kind lru with gtf.mode constant and gtf.alpha 1 (teacher "
                          "forcing; any other forcing makes the recurrence nonlinear: use solver.kind deer)")
    if cfg.train.seq_len is not None and cfg.train.seq_len < 2:
        raise ConfigError(f"train.seq_len: must be >= 2 or null (whole series), got {cfg.train.seq_len}")
    if cfg.train.carry and cfg.train.seq_len is None:
        raise ConfigError("train.carry: carried windows need train.seq_len (a window length)")
    if cfg.train.burn_in and (cfg.train.seq_len is None or cfg.train.carry):
        raise ConfigError(f"train.burn_in: a burn-in ({cfg.train.burn_in} steps) applies to random windows "
                          f"(train.seq_len set, train.carry false); the whole series and carried windows already "
                          f"start from the state the data drove the model to")
    if cfg.data.path is None and cfg.data.dt is None:
        cfg.data.dt = GENERATOR_DT
    return cfg


def load(path: str | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (YAML; None: defaults) and apply ``key=value`` overrides; strict."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set(raw, key.strip(), value)
    return validate(from_dict(Config, raw))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
