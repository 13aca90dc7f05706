"""Orbax checkpoints of the training state, and the parameter fingerprint.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it on commit), so
a crash at any moment leaves the previous complete checkpoint restorable; a half-written one is never
listed.  A new manager is built on every start, so ``latest_step`` is what is on disk (a live
manager's ``latest_step`` can name a save whose commit later failed).

A checkpoint holds the items ``params`` (what evaluation restores, alone), ``optimizer`` (optimizer
state, α, step, skipped count), ``meta`` (JSON), and the training mode's own state (``modes``): for
carried windows ``streams`` (the streams' end states), for the whole series ``warm``: the Newton warm
start as a zarr array of exactly ``(T, M)`` — no padding, whatever the device count — written by
``WarmStartHandler``: every
process writes the rows of its own devices (one chunk per device block, so processes never write the
same chunk) and reads back only the rows of its devices in the layout it restores to.  So a checkpoint
restores onto any number of devices or hosts (elastic resume), and on the same layout bitwise.  In a
multi-host run the checkpoint directory must be storage every process sees (``checkpoint.dir``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from distdeer import distributed
from distdeer.train.modes import StreamEnds, WarmStart

FORMAT = 2  # 2: the items above; 1 (or none): one ``state`` item holding the whole TrainState


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be restored."""


def params_sha256(params) -> str:
    """sha256 over the parameter leaves in the order of their sorted key paths; each contributes its
    key path, dtype, shape and little-endian C-order bytes (gathered to the host)."""
    h = hashlib.sha256()
    leaves = sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0]))
    for path, leaf in leaves:
        a = np.asarray(jax.device_get(leaf))
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<")))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def state_sha256(state, fingerprinted: bool = False) -> str:
    """Fingerprint of everything a resumed step depends on: parameters, optimizer state, α, the step, the
    count of skipped updates and, where the mode says it decides the next step (``fingerprinted``: carried
    windows' end states), the mode's state.  A Newton warm start is left out: it changes the iterations,
    not the solution, and it is T·M floats.  Saved in the metadata
    and checked on every restore — also when the restore lands on another device count (elastic
    resume), where it must be bitwise equal."""
    tree = {"params": state.params, "opt_state": state.opt_state, "alpha": state.alpha, "step": state.step,
            "skipped": state.skipped}
    if fingerprinted:
        tree["mode_state"] = state.mode_state
    return params_sha256(tree)


def location(cfg) -> str:
    """Where a run's checkpoints live: ``checkpoint.dir`` or ``RUN_DIR/checkpoints``."""
    return cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")


def _path(directory: str) -> str:
    return directory if "://" in directory else os.path.abspath(directory)  # gs://, s3:// go to Orbax as is


# -- the whole-series warm start: a (T, M) zarr array written and read per process ---------------------

@dataclasses.dataclass
class WarmSave(ocp.args.CheckpointArgs):
    array: jax.Array  # (n·P, M) in the slot layout (or (T, M) on one device)
    steps: int  # T: rows saved (the padding slots past T are not)


@dataclasses.dataclass
class WarmRestore(ocp.args.CheckpointArgs):
    shape: tuple  # (n·P, M) to restore into
    sharding: jax.sharding.Sharding  # its layout (NamedSharding over "time", or one device's)
    steps: int  # T


def _blocks(sharding: jax.sharding.Sharding, shape: tuple):
    """(device, first row, stop row) of each device of this process in the layout ``sharding``."""
    return [(device, *index[0].indices(shape[0])[:2])
            for device, index in sharding.addressable_devices_indices_map(shape).items()]


class WarmStartHandler(ocp.CheckpointHandler):
    """Saves a time-sharded warm start as a ``(T, M)`` zarr array, each process its own rows."""

    def save(self, directory, args: WarmSave):
        a, T = args.array, args.steps
        M = a.shape[1]
        n = a.sharding.shard_shape(a.shape)[0]
        # Host copies first: once save() returns, the caller may reuse (donate) the device buffers.
        mine = [(s.index[0].indices(a.shape[0])[0], np.asarray(s.data)) for s in a.addressable_shards
                if s.replica_id == 0]
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.fspath(directory / "warm.zarr")}}
        if jax.process_index() == 0:
            ts.open({**spec, "metadata": {
                "shape": [T, M], "data_type": "float32",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, min(n, T)), M]}},
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}},
                create=True, delete_existing=True).result()
        distributed.barrier("distdeer-warm-created")
        out = ts.open(spec, open=True).result()
        writes = [out[start:min(start + len(x), T)].write(x[: max(0, min(len(x), T - start))])
                  for start, x in mine if start < T]
        for w in writes:
            w.result()
        distributed.barrier("distdeer-warm-written")

    def restore(self, directory, args: WarmRestore):
        src = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                      "path": os.fspath(directory / "warm.zarr")}},
                      open=True).result()
        T, M = src.shape
        if T != args.steps or M != args.shape[1]:
            raise ValueError(f"warm start of shape {(T, M)} saved, the run needs ({args.steps}, {args.shape[1]})")
        last = None
        arrays = []
        for device, a, b in _blocks(args.sharding, args.shape):
            x = np.asarray(src[min(a, T):min(b, T)].read().result(), np.float32)
            if len(x) < b - a:  # padding slots: any finite state (they are masked); the last one repeated
                if last is None:
                    last = np.asarray(src[T - 1:T].read().result(), np.float32)
                x = np.concatenate([x, np.repeat(last, b - a - len(x), axis=0)])
            arrays.append(jax.device_put(x, device))
        return jax.make_array_from_single_device_arrays(tuple(args.shape), args.sharding, arrays)


ocp.args.register_with_handler(WarmStartHandler, for_save=True)(WarmSave)
ocp.args.register_with_handler(WarmStartHandler, for_restore=True)(WarmRestore)


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(_path(directory), options=options)


def _optimizer(state) -> dict:
    return {"opt_state": state.opt_state, "alpha": state.alpha, "step": state.step, "skipped": state.skipped}


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, steps: int) -> None:
    """Save ``state`` at ``step`` (``steps`` = T, the rows of a whole-series warm start)."""
    items = {"meta": ocp.args.JsonSave({**meta, "format": FORMAT}), "params": ocp.args.StandardSave(state.params),
             "optimizer": ocp.args.StandardSave(_optimizer(state))}
    if isinstance(state.mode_state, WarmStart):
        items["warm"] = WarmSave(state.mode_state.states, steps)
    elif isinstance(state.mode_state, StreamEnds):
        items["streams"] = ocp.args.StandardSave(state.mode_state)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def _restore(mngr: ocp.CheckpointManager, step: int, items: dict):
    fmt = _read_meta(mngr, step).get("format", 1)
    if fmt != FORMAT:
        raise CheckpointError(f"checkpoint {step} in {mngr.directory} has format {fmt}, this distdeer reads "
                              f"format {FORMAT}; finish that run with the distdeer that wrote it")
    try:
        return mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types for damaged or foreign checkpoints
        raise CheckpointError(f"checkpoint {step} in {mngr.directory} cannot be restored: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(mngr: ocp.CheckpointManager, step: int, target, steps: int):
    """Restore ``step`` into the structure, shapes and shardings of the TrainState ``target`` (a
    whole-series warm start into any device count's layout); returns (state, meta)."""
    items = {"meta": ocp.args.JsonRestore(), "params": ocp.args.StandardRestore(_abstract(target.params)),
             "optimizer": ocp.args.StandardRestore(_abstract(_optimizer(target)))}
    mode_state = target.mode_state
    if isinstance(mode_state, WarmStart):
        items["warm"] = WarmRestore(tuple(mode_state.states.shape), mode_state.states.sharding, steps)
    elif isinstance(mode_state, StreamEnds):
        items["streams"] = ocp.args.StandardRestore(_abstract(mode_state))
    out = _restore(mngr, step, items)
    if isinstance(mode_state, WarmStart):
        mode_state = WarmStart(out.warm)
    elif isinstance(mode_state, StreamEnds):
        mode_state = StreamEnds(*out.streams)
    o = out.optimizer
    state = target._replace(params=out.params, opt_state=o["opt_state"], alpha=o["alpha"], step=o["step"],
                            skipped=o["skipped"], mode_state=mode_state)
    return state, dict(out.meta)


def restore_params(mngr: ocp.CheckpointManager, step: int, target_params):
    """Only the parameters of checkpoint ``step`` (evaluation needs nothing of the training state)."""
    return _restore(mngr, step, {"params": ocp.args.StandardRestore(_abstract(target_params))}).params


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    try:
        return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except Exception as e:
        raise CheckpointError(f"checkpoint {step} in {mngr.directory} has no readable metadata: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None


def read_meta(directory: str, step: int) -> dict:
    return _read_meta(ocp.CheckpointManager(_path(directory)), step)
