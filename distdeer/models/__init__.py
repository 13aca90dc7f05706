"""Recurrent models of dynamical systems."""

from distdeer.models.plrnn import (
    clipped_shplrnn,
    clipped_shplrnn_jac,
    clipped_shplrnn_jac_diag,
    init_shplrnn,
    shplrnn,
    shplrnn_jac,
    shplrnn_jac_diag,
)

__all__ = ["clipped_shplrnn", "clipped_shplrnn_jac", "clipped_shplrnn_jac_diag", "init_shplrnn",
           "shplrnn", "shplrnn_jac", "shplrnn_jac_diag"]
