"""modalimmune_jax: multimodal models immune to losing a modality (DESIGN.md).

The public transforms are pure, jit-able functions of pytrees (DESIGN.md §7).
"""

from modalimmune_jax.controller import (
    ControllerState,
    information_gain,
    init_controller,
    select_target,
    update_controller,
)
from modalimmune_jax.curvature import CurvatureEMA, hutchinson_diagonal
from modalimmune_jax.curvature_mask import curvature_mask, split_gradients
from modalimmune_jax.hvp import hvp, linearized_hvp
from modalimmune_jax.hypergrad import implicit_hypergradient, neumann_inverse_hvp
from modalimmune_jax.interventions import drop_modalities
from modalimmune_jax.lanczos import extreme_eigenvalues
from modalimmune_jax.spectral import (
    collapse_regularizer,
    effective_rank,
    spectral_collapse,
    stable_rank,
)

__all__ = [
    "ControllerState",
    "CurvatureEMA",
    "collapse_regularizer",
    "curvature_mask",
    "drop_modalities",
    "effective_rank",
    "extreme_eigenvalues",
    "hutchinson_diagonal",
    "hvp",
    "implicit_hypergradient",
    "information_gain",
    "init_controller",
    "linearized_hvp",
    "neumann_inverse_hvp",
    "select_target",
    "spectral_collapse",
    "split_gradients",
    "stable_rank",
    "update_controller",
]
