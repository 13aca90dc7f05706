"""distdeer: GTF-DEER training of recurrent models of dynamical systems, parallel over time.

``import distdeer`` loads JAX only (never Ray).
"""

from distdeer import gtf
from distdeer.solver import (
    Result,
    Solution,
    SolverError,
    deer,
    deer_batch,
    deer_shard,
    default_tolerances,
    sequential,
)

__version__ = "0.1.0"
__all__ = ["Result", "Solution", "SolverError", "deer", "deer_batch", "deer_shard",
           "default_tolerances", "gtf", "sequential"]
