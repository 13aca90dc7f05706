"""Parallel-in-time solvers: the sequential reference, affine scans, and DEER with its adjoint."""

from distdeer.solver.api import SolverError, deer, deer_batch, deer_shard, default_tolerances
from distdeer.solver.newton import Result, Solution
from distdeer.solver.sequential import sequential

__all__ = ["Result", "Solution", "SolverError", "deer", "deer_batch", "deer_shard",
           "default_tolerances", "sequential"]
