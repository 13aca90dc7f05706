"""Whole-series training sharded over time on 1, 2, 4 and 8 simulated CPU devices against one device.

Run by tests/test_multidevice.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (not collected by the main pytest run).  The program
is the one ``distdeer train`` runs (``mode.place`` → ``loop.initial_state`` → ``loop.compile_step``);
T is chosen not to be a multiple of the device counts (and once a multiple, where the last target is
the replicated end row).
"""

import jax
import numpy as np
import pytest

from distdeer import config as config_mod
from distdeer import mesh as mesh_mod
from distdeer.bench.hlo import collective_bytes
from distdeer.bench.train import sharded
from distdeer.data import loader
from distdeer.models import Model
from distdeer.train import loop, modes


def test_eight_devices_are_simulated():
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def train(devices: int, T: int, steps: int = 5, *overrides):
    """(losses, Newton iterations, final state) of ``steps`` whole-series training steps on ``devices``."""
    cfg = config_mod.load(None, [f"data.steps={T + 1}", "model.hidden=16", f"train.steps={steps}", "gtf.every=1",
                                 "gtf.decay=0.2", "solver.fallback=false", f"mesh.devices={devices}", *overrides])
    source = loader.open_source(cfg)
    model = Model.from_config(cfg.model, source.shape[1])
    mesh = mesh_mod.build(cfg, T + 1)
    mode = modes.for_config(cfg, model, mesh, T)
    data = mode.place(source, mesh)
    state = loop.initial_state(model, cfg, mode, data, mesh)
    run_step = loop.compile_step(model, cfg, mode, mesh, state, data)
    losses, iters = [], []
    for _ in range(steps):
        state, m = run_step(state, data)
        assert bool(m.converged) and int(m.skipped) == 0
        losses.append(float(m.loss))
        iters.append(int(m.newton_iterations))
    return np.array(losses), iters, state


@pytest.mark.parametrize("T, overrides", [(1001, ()), (1000, ()), (803, ("train.noise=0.1", "model.readout=affine",
                                                                       "model.latent=4"))])
def test_sharded_training_matches_one_device(T, overrides):
    """Loss within 1e-5 (relative) and identical Newton iterations over 5 steps, also with forcing noise
    (drawn per global row) and an affine readout; the warm start stays sharded, (n·P, M)."""
    ref_loss, ref_iters, ref_state = train(1, T, 5, *overrides)
    assert max(ref_iters) > 1  # the steps do solve something (α decays, so Newton has work)
    for devices in (2, 4, 8):
        loss, iters, state = train(devices, T, 5, *overrides)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        assert iters == ref_iters, (devices, iters, ref_iters)
        n = -(-T // devices)
        warm, ref_warm = state.mode_state.states, ref_state.mode_state.states
        assert warm.shape == (n * devices, ref_warm.shape[1])
        assert warm.sharding.spec == jax.sharding.PartitionSpec("time")
        assert {s.data.shape[0] for s in warm.addressable_shards} == {n}
        np.testing.assert_allclose(np.asarray(warm)[:T], np.asarray(ref_warm), atol=1e-4)
        np.testing.assert_allclose(float(state.alpha), float(ref_state.alpha), rtol=1e-5)


def test_no_collective_of_the_training_step_grows_with_T():
    """The compiled training step exchanges the same bytes at T = 2^12 + 1 and 2^14 + 3 (4 devices): only
    halos, slice summaries and scalars cross devices, never a time series."""
    small, large = (sharded(T, 4, compile_only=True, hidden=16) for T in (2 ** 12 + 1, 2 ** 14 + 3))
    assert small["collective_bytes_per_step"] == large["collective_bytes_per_step"] > 0
    # the per-device memory does grow with the slice (the reading is not a constant)
    assert large["memory_per_device_bytes"] > 3 * small["memory_per_device_bytes"]


def test_collective_bytes_reads_every_kind():
    """The HLO reader counts every collective kind, reduce-scatter and async -start forms included."""
    hlo = """
  %all-gather.1 = f32[4,3]{1,0} all-gather(f32[1,3]{1,0} %p), dimensions={0}
  %ar = (f32[2]{0}, s32[]) all-reduce-start(f32[2]{0} %a, s32[] %b), to_apply=%sum
  %ard = (f32[2]{0}, s32[]) all-reduce-done((f32[2]{0}, s32[]) %ar)
  ROOT %rs = f32[8]{0} reduce-scatter(f32[32]{0} %c), dimensions={0}
  %cp = pred[] collective-permute(pred[] %d), source_target_pairs={{0,1}}
"""
    assert collective_bytes(hlo) == {"all-gather": 48, "all-reduce": 12, "reduce-scatter": 32,
                                     "collective-permute": 1}


def test_chunked_training_with_the_diagonal_adjoint_matches_the_defaults():
    """solver.chunk (here 37 steps: many chunks per device and a remainder) and solver.adjoint=diagonal
    (matrix-free sweeps) train like the defaults (no chunking at this size, dense adjoint), on 1 and 4
    devices: the gradients agree to solver tolerance, so the losses of 5 steps do to 1e-4."""
    base = ("solver.jacobian=diagonal",)
    ref_loss, _, _ = train(1, 803, 5, *base)
    for devices in (1, 4):
        loss, _, _ = train(devices, 803, 5, *base, "solver.chunk=37", "solver.adjoint=diagonal")
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
