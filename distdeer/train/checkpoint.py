"""Orbax checkpoints of the training state, and the parameter fingerprint.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it on commit), so
a crash at any moment leaves the previous complete checkpoint restorable; a half-written one is never
listed.  A new manager is built on every start, so ``latest_step`` is what is on disk (a live
manager's ``latest_step`` can name a save whose commit later failed, DESIGN §4).
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


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


def state_sha256(state, carried: bool = False) -> str:
    """Fingerprint of everything a resumed step depends on: parameters, optimizer state, α, the step and,
    with carried windows (``carried``), the streams' end states in ``state.warm``.  A Newton warm start is
    left out: it changes the iterations, not the solution, and it is T·M floats.  Saved in the metadata
    and checked on every restore — also when the restore lands on another device count (elastic
    resume), where it must be bitwise equal."""
    tree = {"params": state.params, "opt_state": state.opt_state, "alpha": state.alpha, "step": state.step}
    if carried:
        tree["carried"] = state.warm
    return params_sha256(tree)


def location(cfg) -> str:
    """Where a run's checkpoints live: ``checkpoint.dir`` or ``RUN_DIR/checkpoints``."""
    return cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")


def _path(directory: str) -> str:
    return directory if "://" in directory else os.path.abspath(directory)  # gs://, s3:// go to Orbax as is


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(_path(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)


def restore(mngr: ocp.CheckpointManager, step: int, target):
    """Restore ``step`` into the structure of ``target`` (abstract arrays are fine)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                         meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for damaged or foreign checkpoints
        raise CheckpointError(f"checkpoint {step} in {mngr.directory} cannot be restored: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    return out.state, dict(out.meta)


def read_meta(directory: str, step: int) -> dict:
    mngr = ocp.CheckpointManager(_path(directory))
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
