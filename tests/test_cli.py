"""The ``distdeer`` command: the solver benchmark runs end to end; bad input is one line, exit 2."""

import json
import os
import subprocess
import sys

import pytest

from distdeer.cli import main


def test_bench_solver_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "solver", "--T", "1500", "--latent", "3", "--hidden", "8", "--repeats", "1",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["converged"] and res["T"] == 1500
    assert res["max_state_error"] < 1e-4 and res["grad_rel_error"] < 1e-3
    for key in ("sequential_forward_s", "bptt_value_grad_s", "deer_forward_s", "deer_value_grad_s",
                "ratio_value_grad", "newton_iterations", "peak_rss_bytes"):
        assert key in res
    assert "ratio DEER/sequential" in capsys.readouterr().out


def test_bench_solver_user_path_autodiff_default_init(tmp_path):
    """The path a user's own step takes (Jacobians by autodiff, the default initial guess) gives the same
    states and gradient as the sequential reference, and as the analytic path."""
    out = tmp_path / "user.json"
    assert main(["bench", "solver", "--T", "1500", "--latent", "3", "--hidden", "8", "--repeats", "1",
                 "--jacobian-source", "autodiff", "--init", "default", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["jacobian_source"], res["init"]) == ("autodiff", "default")
    assert res["converged"] and res["max_state_error"] < 1e-4 and res["grad_rel_error"] < 1e-3


def test_bench_solver_sharded_in_a_fresh_process(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "distdeer.cli", "bench", "solver", "--T", "999", "--latent", "2",
                           "--hidden", "8", "--devices", "3", "--jacobian", "diagonal", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 3 and res["converged"] and res["max_state_error"] < 1e-4


@pytest.mark.parametrize("argv,needle", [
    (["bench", "solver", "--T", "0"], "--T must be >= 1"),
    (["bench", "solver", "--latent", "x"], "--latent must be an integer"),
    (["bench", "solver", "--jacobian", "full"], "invalid choice"),
    (["bench", "solver", "--alpha", "1.5"], "--alpha must lie in [0, 1]"),
    (["bench", "solver", "--json", "/nonexistent-dir/x.json"], "does not exist"),
    (["bench"], "required"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that wrote anything under a relative path would write here
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distdeer: error:") and needle in err
    assert os.listdir(tmp_path) == []
