"""A user's own latent map through the CLI (``model.kind: custom``, examples/tanh_rnn.py): it trains on 1
and 4 simulated devices to the same losses, checkpoints, resumes and evaluates like the built-in models;
its autodiff Jacobians equal the closed form; a factory that cannot be imported, or returns the wrong
shapes, is one line and exit 2 with nothing written."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distdeer import config
from distdeer.cli import main
from distdeer.models import Model
from problems import logged_losses, train_on_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOM = ["model.kind=custom", "model.factory=examples.tanh_rnn:make", "model.hidden=16", "data.steps=2001",
          "train.log_every=5", "checkpoint.every=10"]


def train(run_dir, devices: int, *extra):
    return train_on_devices(run_dir, devices, *CUSTOM, *extra)


def test_custom_model_trains_on_1_and_4_devices_resumes_and_evaluates(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    p1 = train(one, 1, "train.steps=20")
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert np.isfinite(json.load(open(one / "eval.json"))["D_stsp"]["value"])  # evaluated at the end, like any model
    p4 = train(four, 4, "train.steps=20", "mesh.devices=4")
    assert p4.returncode == 0, p4.stderr[-3000:]
    l1, l4 = logged_losses(one), logged_losses(four)
    assert sorted(l1) == sorted(l4) == [5, 10, 15, 20]
    np.testing.assert_allclose([l4[s] for s in sorted(l4)], [l1[s] for s in sorted(l1)], rtol=1e-4)
    resumed = train(one, 1, "train.steps=20")  # the same command again: restores (and checks) its checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from its checkpoint at step 20" in resumed.stdout and logged_losses(one) == l1


def test_autodiff_jacobian_of_the_example_equals_its_closed_form():
    cfg = config.load(None, CUSTOM[:3])
    cwd = os.getcwd()
    os.chdir(ROOT)  # the factory is imported from the working directory
    try:
        model = Model.from_config(cfg.model, 3)
    finally:
        os.chdir(cwd)
    F = model.init(jax.random.PRNGKey(3))["F"]
    z = jax.random.normal(jax.random.PRNGKey(4), (3,))
    s = 1 - jnp.tanh(F["W1"] @ z + F["b1"]) ** 2
    exact = jnp.diag(F["a"]) + F["W2"] @ (s[:, None] * F["W1"])
    np.testing.assert_allclose(model.jac(F, z), exact, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.jac_diag(F, z), jnp.diagonal(exact), rtol=1e-5, atol=1e-6)


BAD = '''
import jax.numpy as jnp
def wrong_shape(latent, hidden):
    return {"init": lambda key: {"w": jnp.ones((latent + 1,))}, "step": lambda p, z: p["w"] * 1.0}
def no_step(latent, hidden):
    return {"init": lambda key: {}}
'''


@pytest.mark.parametrize("factory,needle", [
    ("no_such_module:make", "cannot import"),
    ("badfactory:missing", "cannot import"),
    ("badfactory:wrong_shape", "step returns shape (4,), expected (3,)"),
    ("badfactory:no_step", "must return init and step functions"),
    ("badfactory", "expected package.module:function"),
])
def test_bad_factory_is_one_line_exit_2(factory, needle, tmp_path, monkeypatch, capsys):
    (tmp_path / "badfactory.py").write_text(BAD)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["train", os.path.join(ROOT, "configs", "lorenz63.yaml"), "model.kind=custom",
                 f"model.factory={factory}", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not run_dir.exists()


def test_factory_only_with_kind_custom(capsys):
    assert main(["train", os.path.join(ROOT, "configs", "lorenz63.yaml"), "model.factory=examples.tanh_rnn:make",
                 "run.dir=/nonexistent/never"]) == 2
    assert "exactly when model.kind is custom" in capsys.readouterr().err
