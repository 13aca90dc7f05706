"""The one place that starts ``jax.distributed`` (one JAX process per host) and the few collectives
the training loop needs outside its jitted step.

``initialize`` must run before any other JAX call of the process and only once per process (a JAX
process group cannot lose a member and cannot be re-joined: a launcher recovers by starting fresh
processes, design §4).
"""

from __future__ import annotations

import numpy as np


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on this machine at the moment (bound to ``host``; "" for every interface), for a
    coordinator or a service about to listen on it."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 300) -> None:
    """Join the process group: ``coordinator`` is ``host:port`` of process 0's coordination service."""
    import jax

    # The coordinator (process 0) listens on the address the others connect to, not on every interface.
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               coordinator_bind_address=coordinator)


def shutdown() -> None:
    import jax

    jax.distributed.shutdown()


def is_primary() -> bool:
    """Process 0 writes the run directory's plain files (config, metrics, figures)."""
    import jax

    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any — so that all processes stop at the same step
    (a checkpoint save is collective).  One process: ``flag`` itself, no communication."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
