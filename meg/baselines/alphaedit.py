"""AlphaEdit (Fang et al. 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing"): MEMIT's
z, keys and layer loop, with every update projected onto the null space of the preserved keys.

Notation (paper -> code): K0 = the corpus keys, with K0 K0^T estimated by C0 = E[k k^T]
(``meg.baselines.covariance``); P = U_s U_s^T where U_s are the eigenvectors of C0 whose eigenvalue
is below ``nullspace_threshold`` (so P K0 ~ 0: an update W + Delta P leaves preserved keys'
outputs unchanged); K1 = this batch's keys, Kp = the keys of batches edited before (sequential
editing, ``batch_size`` > 0); R = the residuals as in MEMIT. The update of layer l is

    Delta = R K1^T P (Kp Kp^T P + K1 K1^T P + l2 * I)^-1

computed, as in the paper's code, by solving (P (K1 K1^T + Kp Kp^T) + l2 I) X = P K1 R^T for
X = Delta^T. After a batch, Kp Kp^T grows by the batch's keys read from the edited model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meg.baselines import keys
from meg.baselines.memit import LeastSquaresConfig, LeastSquaresEditor
from meg.errors import ConfigError


@dataclass
class AlphaEditConfig(LeastSquaresConfig):
    nullspace_threshold: float = 2e-2  # eigenvalues of C0 below this span the preserved keys' null space
    l2: float = 10.0  # the identity term of the solve

    method = "alphaedit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.nullspace_threshold > 0:
            raise ConfigError(f"alphaedit: bad value for 'nullspace_threshold': {self.nullspace_threshold!r}")
        if not self.l2 >= 0:
            raise ConfigError(f"alphaedit: bad value for 'l2': {self.l2!r}")


def null_space_projector(c0: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P (I, I) onto the eigenvectors of C0 with eigenvalue below ``threshold``, and their count."""
    vals, vecs = torch.linalg.eigh(c0.double())  # ascending eigenvalues
    small = vecs[:, vals < threshold]  # (I, r)
    return small @ small.T, int(small.shape[1])


class AlphaEdit(LeastSquaresEditor):
    name = "alphaedit"
    label = "AlphaEdit"
    config_class = AlphaEditConfig

    def _begin(self, loaded, layers, c0, cfg) -> dict:
        proj, dims = {}, {}
        for l in layers:
            proj[l], dims[l] = null_space_projector(c0[l], cfg.nullspace_threshold)
        inner = next(iter(proj.values())).shape[0]
        return {"P": proj, "null_dims": dims, "Kp": {l: torch.zeros(inner, inner, dtype=torch.float64) for l in layers}}

    def _solve(self, k, res, layer, state, cfg) -> torch.Tensor:
        p = state["P"][layer]  # (I, I)
        a = p @ (k.T @ k + state["Kp"][layer]) + cfg.l2 * torch.eye(p.shape[0], dtype=torch.float64)
        x = torch.linalg.solve(a, p @ k.T @ res)  # (I, D) = Delta^T
        return x.T

    def _end_batch(self, loaded, batch, layers, prefixes, state, cfg, run_dir, b) -> None:
        if not cfg.batch_size:
            return  # one batch: nothing comes after it
        for l in layers:
            k = keys.edit_keys(loaded, batch, l, prefixes, cfg.progress).double()
            state["Kp"][l] += k.T @ k

    def _report(self, state) -> dict:
        return {"null_space_dims": {str(l): d for l, d in state["null_dims"].items()}}
