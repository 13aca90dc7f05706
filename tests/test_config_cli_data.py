"""Config loading (strict), the shipped configs, and the data commands."""

import glob
import os

import numpy as np
import pytest

from distdeer import config
from distdeer.cli import main
from distdeer.data import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_are_valid(path):
    cfg = config.load(path)
    assert cfg.train.steps > 0 and cfg.model.kind in config.CHOICES["model.kind"]


def test_config_round_trip_and_overrides(tmp_path):
    cfg = config.load(None, ["train.steps=7", "model.kind=alrnn", "train.seq_len=200", "train.lr=1e-3"])
    assert (cfg.train.steps, cfg.model.kind, cfg.train.seq_len, cfg.train.lr) == (7, "alrnn", 200, 1e-3)
    p = tmp_path / "c.yaml"
    p.write_text(config.dump(cfg))
    assert config.load(str(p)) == cfg


@pytest.mark.parametrize("overrides,needle", [
    (["model.kind=lstm"], "model.kind: must be one of"),
    (["train.seq_len=1"], "train.seq_len"),
    (["gtf.alpha=2"], "gtf.alpha"),
    (["train.steps=1.5"], "expected int"),
    (["train.lr_end=1"], "must not exceed"),
    (["model=3"], "expected a mapping"),
    (["nokey"], "dotted.key=value"),
    (["solver.chunk=0"], "solver.chunk: must be > 0"),
    (["solver.adjoint=sweeps"], "solver.adjoint: expected"),
    (["gtf.mode=constant", "gtf.alpha_min=0.1"], "gtf.alpha_min: a floor"),
    (["gtf.alpha=0.3", "gtf.alpha_min=0.5"], "gtf.alpha_min: a floor"),
    (["gtf.alpha_min=-0.1"], "gtf.alpha_min: a floor"),
])
def test_config_errors(overrides, needle):
    with pytest.raises(config.ConfigError, match=needle):
        config.load(None, overrides)


def test_data_generate_and_import(tmp_path, capsys):
    out = tmp_path / "l96.zarr"
    assert main(["data", "generate", "lorenz96", "--steps", "3000", "--dim", "5", "--noise", "0.05",
                 "--out", str(out)]) == 0
    x, attrs = store.read(str(out))
    assert x.shape == (3000, 5) and attrs["system"] == "lorenz96"
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(0), 1.0, atol=1e-3)
    assert main(["data", "generate", "lorenz63", "--steps", "10", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    raw = np.random.default_rng(0).normal(size=(500, 2)) * [3.0, 0.5] + [1.0, -2.0]
    np.savetxt(tmp_path / "s.csv", raw, delimiter=",")
    assert main(["data", "import", str(tmp_path / "s.csv"), "--out", str(tmp_path / "s.zarr")]) == 0
    z, info = store.load(str(tmp_path / "s.zarr"))
    np.testing.assert_allclose(z * np.asarray(info["std"]) + np.asarray(info["mean"]), raw, atol=1e-4)
    for path in ("s.zarr", "s.csv"):  # any format back in its own units (what eval compares)
        np.testing.assert_allclose(store.read_data_units(str(tmp_path / path)), raw, atol=1e-4)
    bad = raw.copy()
    bad[7, 1] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    capsys.readouterr()
    assert main(["data", "import", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "bad.zarr")]) == 2
    err = capsys.readouterr().err
    assert "NaN/inf" in err and err.count("\n") == 1
    assert not (tmp_path / "bad.zarr").exists()


def test_config_reference_is_current():
    """docs/config.md is generated from the config dataclasses; regenerate it when a key changes."""
    from distdeer import config_reference

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")
    with open(path) as f:
        assert f.read() == config_reference.markdown(), "run: python -m distdeer.config_reference > docs/config.md"
    keys = [line.split("`")[1] for line in config_reference.markdown().splitlines() if line.startswith("| `")]
    flat = []

    def walk(d, prefix=""):
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.append(prefix + k)

    from distdeer.config import Config, to_dict
    walk(to_dict(Config()))
    assert keys == flat  # every key, once, in the dataclasses' order
