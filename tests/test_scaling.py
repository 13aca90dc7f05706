"""launch/scaling.py at tiny sizes: 1 and 4 simulated devices in one process, 4 in 2 real processes;
well-formed outputs, collectives independent of T, breakdown consistent with the measured total."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "scaling.py")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "study"
    proc = subprocess.run([sys.executable, SCRIPT, "--devices", "1,4", "--hosts", "1,2", "--T", "257,1025",
                           "--latent", "3", "--hidden", "8", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def test_outputs_well_formed(study):
    rows = json.loads((study / "scaling.json").read_text())["rows"]
    points = {(r["processes"], r["devices"], r["T"]) for r in rows}
    assert points == {(1, d, T) for d in (1, 4) for T in (257, 1025)} | {(2, 4, T) for T in (257, 1025)}
    with open(study / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for col in ("devices", "processes", "T", "M", "L", "jacobian", "newton_iterations", "per_iteration_s",
                "forward_s", "value_grad_s", "local_scan_s", "cross_device_s", "collective_bytes",
                "peak_rss_bytes", "bptt_value_grad_s"):
        assert col in table[0] and all(row[col] != "" for row in table), col
    for r in rows:
        assert r["converged"] and r["newton_iterations"] >= 1
        for key in ("per_iteration_s", "forward_s", "value_grad_s", "jacobian_s", "local_scan_s", "bptt_value_grad_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["peak_rss_bytes"] > 0
    assert (study / "scaling.png").stat().st_size > 10_000


def test_collectives_independent_of_T_and_breakdown_bounded(study):
    rows = json.loads((study / "scaling.json").read_text())["rows"]
    for r in rows:
        same = [q["collective_bytes"] for q in rows if q["devices"] == r["devices"]]
        assert len(set(same)) == 1, same  # bytes per iteration do not depend on T (nor on processes)
        assert (r["collective_bytes"] == 0) == (r["devices"] == 1)
        assert (r["cross_device_s"] == 0) == (r["devices"] == 1)
        parts = r["jacobian_s"] + r["local_scan_s"] + r["cross_device_s"]
        # Pieces are timed alone (no overlap, their own dispatch), so only a loose bound is meaningful.
        assert parts <= 3 * r["per_iteration_s"] + 0.01, r  # (other_s is the remainder by definition)
    # Same problem, same answer: the loss does not depend on the layout.
    for T in (257, 1025):
        losses = [r["loss"] for r in rows if r["T"] == T]
        assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]) + 1e-6, losses


@pytest.mark.parametrize("args, message", [
    (["--devices", "3", "--hosts", "2", "--T", "100"], "multiple of hosts"),
    (["--devices", "1", "--T", "x"], "integers"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, SCRIPT, *args, "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "o").exists()


def test_gpu_summary_of_a_bench_folder(study, tmp_path, capsys):
    """``distdeer.bench.gpu_summary`` on the files launch/gpu_bench.sh writes (solver runs, scan bandwidth,
    one-device scaling rows): speed-ups, and cost-model constants consistent with the raw numbers."""
    from distdeer.bench import gpu_summary, solver
    from distdeer.bench.scaling import scan_bandwidth

    res = solver.run(solver.SolverBench(T=300, latent=3, hidden=8, repeats=1))
    solver.write_json(res, str(tmp_path / "solver-T300-M3.json"))
    (tmp_path / "bandwidth.json").write_text(json.dumps([scan_bandwidth(512, 3, repeats=1)]))
    rows = [r for r in json.loads((study / "scaling.json").read_text())["rows"]
            if r["devices"] == 1 and r["processes"] == 1]
    for r in rows:
        (tmp_path / f"row-T{r['T']}-M3.json").write_text(json.dumps(r))
    assert gpu_summary.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"speed-up {res['bptt_value_grad_s'] / res['deer_value_grad_s']:7.1f}x" in printed
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert [r["T"] for r in doc["solver"]] == [300] and len(doc["rows"]) == len(rows) == 2
    model = doc["model"]
    assert model["k_value_grad_iterations"] == pytest.approx(res["deer_value_grad_s"] / res["per_iteration_s"])
    assert model["c_bptt_s_per_step"] == pytest.approx(res["bptt_value_grad_s"] / 300)
    assert model["c_coll_s_per_device"] == 0 and model["c_local_s_per_step"] >= 0
    for p in doc["projection"]["rows"]:
        assert p["devices"] == 1 and p["speedup_vs_bptt"] == pytest.approx(p["bptt_value_grad_s"] / p["value_grad_s"])
    assert "PROJECTION" in doc["projection"]["note"]
