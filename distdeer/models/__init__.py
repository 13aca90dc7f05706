"""Recurrent models of dynamical systems."""

from distdeer.models.model import Model
from distdeer.models.plrnn import (
    clipped_shplrnn,
    clipped_shplrnn_jac,
    clipped_shplrnn_jac_diag,
    init_shplrnn,
    shplrnn,
    shplrnn_jac,
    shplrnn_jac_diag,
)

__all__ = ["Model", "clipped_shplrnn", "clipped_shplrnn_jac", "clipped_shplrnn_jac_diag", "init_shplrnn",
           "shplrnn", "shplrnn_jac", "shplrnn_jac_diag"]
