"""The dynamic neuron: one extra FFN neuron whose weights differ per sample.

Notation (paper -> code): for the FFN input x at layer L and every token position,

    FFN(x) + v * act(k . x + b)        k, v in R^D ("key", "value"), b a scalar ("bias")

A weight vector ``w`` packs one neuron as ``[k (D), v (D), b (1)]``, so ``len(w) == 2 * D + 1``.
A batch of B prompts carries B weight vectors; a row of zeros (or a row marked inactive) leaves
that sample's output bit-identical to the base model, so one forward pass serves a batch that
mixes edited and unrelated queries.

The neuron is attached by wrapping the FFN module of one layer (the original is kept as
``base_layer``) inside a context manager that puts the original back on exit, also after an
exception.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from meg import lm

ACTIVATIONS = ("identity", "ffn")


def weight_dim(hidden: int) -> int:
    """Length of a packed neuron weight vector [k, v, b] for hidden size D."""
    return 2 * hidden + 1


def unpack(w: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 2D+1) -> k (B, D), v (B, D), b (B,)."""
    if w.shape[-1] != weight_dim(hidden):
        raise ValueError(f"neuron weights have length {w.shape[-1]}, expected {weight_dim(hidden)} for hidden {hidden}")
    return w[..., :hidden], w[..., hidden : 2 * hidden], w[..., 2 * hidden]


def pack(k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([k, v, b.unsqueeze(-1)], dim=-1)


def shared_init(hidden: int, intermediate: int | None = None, seed: int = 0) -> torch.Tensor:
    """The one initialisation w0 every edit starts from (nn.Linear's default ranges).

    k and b ~ U(+-1/sqrt(D)) as for an FFN input row; v ~ U(+-1/sqrt(I+1)) as for an output column
    of an FFN with I+1 neurons (I = the FFN's own width, defaulting to 4D).
    """
    g = torch.Generator().manual_seed(seed)
    inter = intermediate or 4 * hidden
    bound_in, bound_out = hidden**-0.5, (inter + 1) ** -0.5
    k = (torch.rand(hidden, generator=g) * 2 - 1) * bound_in
    v = (torch.rand(hidden, generator=g) * 2 - 1) * bound_out
    b = (torch.rand(1, generator=g) * 2 - 1) * bound_in
    return pack(k, v, b[0])


def activation_fn(name: str, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "identity":
        return lambda z: z
    if name == "ffn":
        from transformers.activations import ACT2FN

        return ACT2FN[lm.ffn_activation_name(model)]
    raise ValueError(f"neuron activation {name!r}: choose one of {ACTIVATIONS}")


class DynamicNeuron(nn.Module):
    """Wraps an FFN module and adds one neuron with per-sample weights."""

    def __init__(self, base_layer: nn.Module, hidden: int, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.base_layer = base_layer
        self.hidden = hidden
        self.act = act
        self.weights: torch.Tensor | None = None  # (B, 2D+1)
        self.rows: torch.Tensor | None = None  # (R,) indices of the active rows

    def set_weights(self, w: torch.Tensor | None, active: torch.Tensor | None = None) -> None:
        """Give each sample of the next batches its neuron; rows not in ``active`` get none.

        ``w`` is (B, 2D+1); ``active`` an optional (B,) bool mask. Without a mask, all-zero rows
        are treated as inactive.
        """
        if w is None:
            self.weights, self.rows = None, None
            return
        if w.dim() != 2 or w.shape[1] != weight_dim(self.hidden):
            raise ValueError(f"neuron weights must be (B, {weight_dim(self.hidden)}), got {tuple(w.shape)}")
        if active is None:
            active = w.abs().sum(dim=1) > 0
        self.weights = w
        self.rows = torch.nonzero(active.to(w.device), as_tuple=False).flatten()

    def clear(self) -> None:
        self.set_weights(None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (B, T, D)
        if self.weights is None or self.rows.numel() == 0:
            return out
        if self.weights.shape[0] != x.shape[0]:
            raise ValueError(f"neuron weights are set for {self.weights.shape[0]} samples, the batch has {x.shape[0]}")
        w = self.weights.index_select(0, self.rows).to(dtype=x.dtype)
        k, v, b = unpack(w, self.hidden)  # (R, D), (R, D), (R,)
        xr = x.index_select(0, self.rows)  # (R, T, D)
        z = self.act(torch.einsum("rtd,rd->rt", xr, k) + b[:, None])  # (R, T)
        delta = z.unsqueeze(-1) * v[:, None, :]  # (R, T, D)
        return out.index_add(0, self.rows, delta)


@contextmanager
def attached_neuron(model: nn.Module, layer: int, act: str = "identity") -> Iterator[DynamicNeuron]:
    """Attach a dynamic neuron to the FFN of ``layer`` for the duration of the block."""
    spec = lm.arch_of(model)
    block = lm.decoder_layers(model)[layer]
    base = getattr(block, spec.ffn_name)
    if isinstance(base, DynamicNeuron):
        raise RuntimeError(f"layer {layer} already carries a dynamic neuron")
    neuron = DynamicNeuron(base, lm.hidden_size(model), activation_fn(act, model))
    setattr(block, spec.ffn_name, neuron)
    try:
        yield neuron
    finally:
        setattr(block, spec.ffn_name, base)
