"""Multi-device suites, each in a subprocess with simulated CPU devices (the device count is fixed
when JAX starts, so these cannot share the test process)."""

import os
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_suite(path: str, devices: int, **env):
    full_env = dict(os.environ)
    full_env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        # Persistent compilation cache: reruns (and CI retries on the same machine) skip compilation.
        JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        **env,
    )
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    last = [line for line in proc.stdout.splitlines() if " passed" in line][-1]
    assert "skipped" not in last and "failed" not in last, last
    return last


def test_sharded_solver_on_1_2_3_4_8_devices():
    print(run_suite("tests/subproc/cases_sharded.py", 8))


def test_float64_on_4_devices():
    print(run_suite("tests/subproc/cases_float64.py", 4, JAX_ENABLE_X64="1"))


def test_sharded_training_on_1_2_4_8_devices():
    print(run_suite("tests/subproc/cases_training.py", 8))


def test_lru_scan_float64_on_1_2_3_4_8_devices():
    print(run_suite("tests/subproc/cases_lru.py", 8, JAX_ENABLE_X64="1"))
