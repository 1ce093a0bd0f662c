"""The weight generator: a conditional diffusion model p(w | c) over the neuron weights of all edits.

Every edit has fitted neuron weights w (D values: k, v, b) that started from one shared
initialisation w0, and a condition c, the L2-normalised embedding of its prompt. The generator
learns to produce w from c, so that at inference a paraphrase's embedding yields (nearly) the
weights of the edit it rephrases.

What is diffused is the normalised delta x0 = (w - w0 - mean) / std, with a per-coordinate mean
and std over the training edits (std floored, so a coordinate that barely varies is not blown up).
This replaces the paper's fixed scale of 100 and makes every coordinate equally easy to learn.

Three separate pieces:
- the denoiser, a network f(x_t, t, c) that knows nothing of the noise process: ``DiTDenoiser``
  (the paper's choice: the vector cut into patches, one token per patch, adaLN-Zero blocks) or
  ``MLPDenoiser`` (the ablation);
- the noise process, diffusers' ``DDPMScheduler`` for training (``add_noise``, ``get_velocity``) and
  ``DDIMScheduler`` (eta = 0) or ``DDPMScheduler`` with respaced steps (ancestral) for sampling;
- ``WeightGenerator``, which owns the normalisation, training (AdamW, EMA of the denoiser,
  condition dropout, early stop on the sampled error, atomic resumable checkpoints) and sampling.

Choices measured on 1,000 synthetic edits (``bench/generator_speed.py``) that differ from the paper:
the denoiser predicts x0 ("sample") rather than v; the DiT's default patch is the whole vector (one
token), because adaLN hands every token the same condition and many tokens learn c -> w several
times slower; and conditions are jittered during training (``cond_noise``) so that a paraphrase's
embedding, near its edit's, yields that edit's weights. The paper's setting remains available:
``prediction_type="v_prediction"``, ``patch_size=64``, ``cond_noise=0``.

Sampling is deterministic: every query of a call starts from the same seeded noise vector, so with
DDIM a query's weights depend only on its condition and the seed, not on the other queries of the
batch (up to floating-point rounding of batched products). The ancestral sampler draws fresh noise
per row and step from the same seeded generator: deterministic for a given batch.

Multi-GPU training is not built in. With ``accelerate`` it would go: ``accelerator.prepare`` the
denoiser and optimiser, let each process draw its own slice of every batch (seed + process index),
``accelerator.backward(loss)``, update the EMA on the unwrapped model after each step, and run the
error estimate and checkpointing on the main process only. On one machine the CPU path below is
what runs; nothing here assumes CUDA, and ``device`` / ``dtype`` are explicit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meg.errors import BundleError, ConfigError
from meg.hashing import file_sha256

CONDITIONS = ("tuned", "tuned+base")  # what the weight generator is conditioned on (meg.editor.MegConfig)

# Notation (paper -> code)
#   w = (k, v, b)        one edit's packed neuron weights                 w       (N, D)
#   w0                   shared initialisation of all edits               w0      (D,)
#   c                    L2-normalised prompt embedding, the condition    cond    (N, C)
#   mu, sigma            per-coordinate mean / std of w - w0              mean, std  (D,)
#   x_0                  normalised delta (w - w0 - mu) / sigma           x0      (N, D)
#   t, x_t, eps          diffusion step, noised sample, Gaussian noise    t, xt, noise
#   alpha-bar_t          cumulative signal fraction of the schedule       scheduler.alphas_cumprod
#   v                    sqrt(abar_t) eps - sqrt(1 - abar_t) x_0          target of "v_prediction"
#   theta, theta_EMA     denoiser and its exponential moving average      model, ema
#   empty condition      learned null embedding (condition dropout)       null_emb
#   s                    classifier-free guidance scale                   guidance_scale

DENOISERS = ("dit", "mlp")
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
SAMPLERS = ("ddim", "ancestral")
SPACINGS = ("trailing", "leading", "linspace")
WEIGHTINGS = ("x0", "min_snr", "none")
DTYPES = ("float32", "float64", "bfloat16")
LR_SCHEDULES = ("constant", "cosine")

# Size presets (CLI choices), per denoiser; "s" is the default config. Measured on 1,000 synthetic
# edits on 2 CPU threads: bench/generator_speed.py.
PRESETS: dict[str, dict[str, dict]] = {
    "s": {"dit": dict(width=256, depth=4, heads=4, mlp_ratio=2.0), "mlp": dict(width=512, depth=4, mlp_ratio=2.0)},
    "m": {"dit": dict(width=384, depth=6, heads=6, mlp_ratio=2.0), "mlp": dict(width=768, depth=6, mlp_ratio=2.0)},
    "l": {"dit": dict(width=512, depth=8, heads=8, mlp_ratio=4.0), "mlp": dict(width=1024, depth=8, mlp_ratio=4.0)},
}

CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE = "generator.json", "generator.safetensors", "manifest.json"
CKPT_POINTER = "latest.json"
# Settings added after files of FORMAT_VERSION were first written, with the values that reproduce those
# files: a generator or checkpoint saved without them was built with these.
_PREDATING = {"head_width": 0, "lr_schedule": "constant", "lr_min_ratio": 0.05}
FORMAT_VERSION = 1
# Fields that change neither the training trajectory nor the data it needs: a checkpoint written
# under other values of these is resumed.
_RUN_ONLY_FIELDS = ("max_steps", "checkpoint_every", "eval_every", "eval_size", "eval_steps", "target_error",
                    "sample_steps", "sampler", "guidance_scale", "device")


@dataclass
class GeneratorConfig:
    # --- denoiser
    denoiser: str = "dit"  # "dit" (transformer over patches, the paper's) or "mlp" (residual MLP, the ablation)
    # DiT: values per token, the vector zero-padded to a multiple of it; 0 = one token for the whole vector.
    # Measured: the fewer the tokens the faster c -> w is learned (1,000 edits, ~700 steps: relative error
    # 0.08 with one token, 0.30 with two, 0.53 with 19 tokens of 64), since adaLN gives every token the same c.
    patch_size: int = 0
    width: int = 256  # hidden width (DiT token width, MLP hidden width)
    depth: int = 4  # DiT blocks / MLP residual blocks
    heads: int = 4  # DiT attention heads (width must be divisible by it)
    token_cond: bool = False  # DiT: also add a per-token linear projection of c to the tokens (helps many tokens)
    mlp_ratio: float = 2.0  # hidden size of each block's MLP, as a multiple of width
    # Output head: 0 = one linear map width -> output, whose outputs span at most `width` directions; H > 0 =
    # Linear(width, H) -> GELU -> Linear(H, output), not bound to that rank. Measured on 1,000 CounterFact
    # edits: the best rank-256 approximation of the fitted deltas leaves a relative error of 0.15 (rank 512:
    # 0.05), and a width-256 denoiser with a linear output plateaued at 0.20.
    head_width: int = 2048
    cond_dropout: float = 0.1  # training: probability that a row's condition is replaced by the null embedding
    # training: each condition is jittered to normalise(c + s * g), g ~ N(0, I / C), s ~ U(0, cond_noise), so that
    # conditions near an edit's (paraphrases) map to that edit's weights; cosine to c >= 1 / sqrt(1 + cond_noise^2)
    cond_noise: float = 0.5
    # ... and at most this fraction of the distance from c to the nearest training condition mapped to other weights
    # (0 = no such limit), so that close conditions of different edits (questions on one subject with different
    # answers) stay apart while an isolated edit keeps the full jitter
    cond_noise_gap: float = 0.5
    guidance_scale: float = 1.0  # sampling: classifier-free guidance scale s; 1.0 = plain conditional model (off)
    # --- noise process (diffusers scheduler arguments; saved with the model)
    num_train_timesteps: int = 1000  # diffusion steps of the training process
    beta_schedule: str = "linear"  # "linear" (the paper's) or "squaredcos_cap_v2" (cosine)
    # what the denoiser predicts: "sample" (x0), "v_prediction" or "epsilon". Measured: with v or eps the ideal
    # output includes a full-rank map of x_t that a narrow network cannot form; x0 prediction learned the
    # 1,000-edit map to 0.04 error in 500 steps where v prediction was still at 0.77 (MLP denoiser).
    prediction_type: str = "sample"
    timestep_spacing: str = "trailing"  # which training steps a short sampler visits; "trailing" starts at t = T-1
    # Loss weight over t, expressed in x0 space (a v-loss equals the x0-loss times SNR + 1): "x0" weighs
    # every step alike (the plain loss of "sample"), "min_snr" by min(SNR, gamma), "none" is the plain loss of
    # prediction_type (a plain v-loss puts most of its weight on nearly clean steps).
    loss_weighting: str = "x0"
    min_snr_gamma: float = 5.0  # gamma of "min_snr"
    # --- optimisation
    lr: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear learning-rate warm-up, then the schedule below
    # after warm-up: "constant", or "cosine" decay to lr_min_ratio * lr at max_steps. Raising max_steps and
    # rerunning continues a finished run's checkpoint: under "cosine" that is a warm restart (the rate rises
    # to the new curve), not the run a fresh start with the larger max_steps would give.
    lr_schedule: str = "cosine"
    lr_min_ratio: float = 0.05  # floor of the cosine decay, as a share of lr
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)
    batch_size: int = 256  # training pairs per step (all pairs when there are fewer)
    max_steps: int = 3000  # cap on optimiser steps
    ema_decay: float = 0.995  # EMA of the denoiser weights; sampling uses the EMA model
    std_floor: float = 0.05  # per-coordinate std is at least this fraction of the mean std over coordinates
    seed: int = 0  # initialisation, batches, noise and condition dropout
    # --- sampling
    sample_steps: int = 10  # denoising steps at inference
    sampler: str = "ddim"  # "ddim" (deterministic, eta = 0) or "ancestral" (DDPM with respaced steps)
    # --- checkpoints and early stop
    checkpoint_every: int = 500  # write a resumable checkpoint every this many steps (when a directory is given)
    eval_every: int = 100  # estimate the error every this many steps
    eval_size: int = 128  # training pairs (a fixed random subset) used for the error estimate
    eval_steps: int = 10  # DDIM steps used for the error estimate
    target_error: float = 0.03  # stop once the mean relative L2 error of EMA samples on the subset is below this
    # --- placement
    device: str = "cpu"  # where training and sampling run
    dtype: str = "float32"  # parameter and compute dtype

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"generator: bad value for '{name}': {getattr(self, name)!r} ({why})")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        choices = {"denoiser": DENOISERS, "beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES,
                   "timestep_spacing": SPACINGS, "loss_weighting": WEIGHTINGS, "sampler": SAMPLERS,
                   "dtype": DTYPES, "lr_schedule": LR_SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, " | ".join(allowed))
        if not is_int(self.patch_size) or self.patch_size < 0:
            raise bad("patch_size", "an integer >= 0 (0 = one token for the whole vector)")
        for name in ("width", "depth", "heads", "num_train_timesteps", "batch_size", "max_steps",
                     "sample_steps", "checkpoint_every", "eval_every", "eval_size", "eval_steps"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        for name in ("warmup_steps", "seed", "head_width"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if not isinstance(self.token_cond, bool):
            raise bad("token_cond", "true or false")
        if self.width % 2:
            raise bad("width", "must be even (sin-cos positions)")
        if self.width % self.heads:
            raise bad("heads", f"must divide width {self.width}")
        for name in ("sample_steps", "eval_steps"):
            if getattr(self, name) > self.num_train_timesteps:
                raise bad(name, f"at most num_train_timesteps = {self.num_train_timesteps}")
        for name in ("mlp_ratio", "lr", "target_error", "min_snr_gamma"):
            if not is_num(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a number > 0")
        for name in ("weight_decay", "grad_clip", "guidance_scale", "std_floor", "cond_noise", "cond_noise_gap"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a number >= 0")
        for name in ("cond_dropout", "ema_decay", "lr_min_ratio"):
            if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                raise bad(name, "a number in [0, 1)")
        if self.prediction_type == "epsilon" and self.loss_weighting == "x0":
            raise bad("loss_weighting", "x0 weighting of an epsilon loss divides by SNR ~ 0 at the last steps; "
                      "use min_snr or none")
        if self.guidance_scale != 1.0 and self.cond_dropout == 0:
            raise bad("guidance_scale", "guidance needs a null embedding trained with cond_dropout > 0")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise bad("device", str(e)) from e

    @classmethod
    def from_preset(cls, size: str, **overrides) -> "GeneratorConfig":
        """A config with the dimensions of a size preset ("s", "m", "l") for its denoiser, then `overrides`."""
        if size not in PRESETS:
            raise ConfigError(f"generator: bad value for 'size': {size!r} ({' | '.join(PRESETS)})")
        denoiser = overrides.get("denoiser", cls.denoiser)
        if denoiser not in DENOISERS:
            raise ConfigError(f"generator: bad value for 'denoiser': {denoiser!r} ({' | '.join(DENOISERS)})")
        return cls(**{**PRESETS[size][denoiser], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"generator: unknown setting '{unknown[0]}'")
        return cls(**d)


# --------------------------------------------------------------------------------------- networks


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) diffusion steps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_positions(num_tokens: int, width: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position embeddings: (T, width)."""
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]  # (T, 1)
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width // 2))  # (width/2,)
    angles = pos * omega[None]  # (T, width/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).float()


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return h * (1 + scale) + shift


class ConditionEmbedder(nn.Module):
    """The conditioning vector e = MLP(sin-cos(t)) + W_c c; dropped rows use a learned null embedding."""

    def __init__(self, cond_dim: int, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.c_proj = nn.Linear(cond_dim, width)
        self.null_emb = nn.Parameter(torch.zeros(width))

    def forward(self, t: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        e_t = self.t_mlp(timestep_features(t, self.freq_dim).to(cond.dtype))  # (B, W)
        e_c = self.c_proj(cond)  # (B, W)
        if drop is not None:
            e_c = torch.where(drop[:, None], self.null_emb.expand_as(e_c), e_c)
        return e_t + e_c

    def initialize_weights(self) -> None:
        for layer in self.t_mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        # c has unit norm spread over C coordinates: scale so that W_c c has entries of order 1.
        nn.init.normal_(self.c_proj.weight, std=1.0)
        nn.init.zeros_(self.c_proj.bias)
        nn.init.normal_(self.null_emb, std=1.0)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, W = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, T, W/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, W/H)
        return self.proj(out.transpose(1, 2).reshape(B, T, W))  # (B, T, W)


class DiTBlock(nn.Module):
    """Pre-norm transformer block; shift, scale and gate of both branches come from the conditioning vector."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(e)[:, None].chunk(6, dim=-1)  # each (B, 1, W)
        h = h + gate1 * self.attn(modulate(self.norm1(h), shift1, scale1))  # (B, T, W)
        return h + gate2 * self.mlp(modulate(self.norm2(h), shift2, scale2))  # (B, T, W)


def output_head(width: int, out: int, head_width: int = 0) -> nn.Module:
    """width -> out: one linear map (head_width 0), or a one-hidden-layer GELU MLP of head_width units."""
    if not head_width:
        return nn.Linear(width, out)
    return nn.Sequential(nn.Linear(width, head_width), nn.GELU(approximate="tanh"), nn.Linear(head_width, out))


def last_linear(head: nn.Module) -> nn.Linear:
    """The layer of an output head that adaLN-Zero initialises to zero."""
    return head if isinstance(head, nn.Linear) else head[-1]


class FinalLayer(nn.Module):
    def __init__(self, width: int, out: int, head_width: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = output_head(width, out, head_width)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(e)[:, None].chunk(2, dim=-1)  # each (B, 1, W)
        return self.linear(modulate(self.norm(h), shift, scale))  # (B, T, out)


class DiTDenoiser(nn.Module):
    """Transformer denoiser over a flat vector: f(x_t, t, c) -> (B, D), one token per patch of values."""

    def __init__(self, dim: int, cond_dim: int, patch_size: int = 0, width: int = 256, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0, token_cond: bool = False, head_width: int = 0):
        super().__init__()
        self.dim, self.patch_size = dim, patch_size or dim
        self.num_tokens = math.ceil(dim / self.patch_size)
        self.patch_embed = nn.Linear(self.patch_size, width)
        self.register_buffer("pos", sincos_positions(self.num_tokens, width), persistent=False)  # (T, W)
        self.embed = ConditionEmbedder(cond_dim, width)
        # optional: each token also gets its own linear projection of c (adaLN alone broadcasts c to all tokens)
        self.token_cond = nn.Linear(cond_dim, self.num_tokens * width) if token_cond else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width, self.patch_size, head_width)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.embed.initialize_weights()
        if self.token_cond is not None:
            nn.init.normal_(self.token_cond.weight, std=1.0)  # entries of order 1 for a unit c, like the positions
        # adaLN-Zero: every residual branch and the output start at zero, so a fresh model is a no-op.
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final.ada[-1], last_linear(self.final.linear)):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        x = F.pad(x, (0, self.num_tokens * self.patch_size - self.dim))  # (B, T*P)
        h = self.patch_embed(x.view(B, self.num_tokens, self.patch_size)) + self.pos  # (B, T, W)
        if self.token_cond is not None:
            h_c = self.token_cond(cond).view(B, self.num_tokens, -1)  # (B, T, W)
            if drop is not None:
                h_c = h_c.masked_fill(drop[:, None, None], 0.0)
            h = h + h_c
        e = self.embed(t, cond, drop)  # (B, W)
        for block in self.blocks:
            h = block(h, e)  # (B, T, W)
        out = self.final(h, e)  # (B, T, P)
        return out.reshape(B, -1)[:, : self.dim]  # (B, D)


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.cond = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.norm(h)) + self.cond(e)))  # (B, W)


class MLPDenoiser(nn.Module):
    """Residual MLP denoiser on [x_t, e] (e = timestep + condition embedding), re-injecting e in every block."""

    def __init__(self, dim: int, cond_dim: int, width: int = 512, depth: int = 4, mlp_ratio: float = 2.0,
                 head_width: int = 0):
        super().__init__()
        self.dim = dim
        self.embed = ConditionEmbedder(cond_dim, width)
        self.inp = nn.Linear(dim + width, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width, int(width * mlp_ratio)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = output_head(width, dim, head_width)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.embed.initialize_weights()
        for block in self.blocks:
            nn.init.zeros_(block.fc2.weight)
        nn.init.zeros_(last_linear(self.out).weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embed(t, cond, drop)  # (B, W)
        h = self.inp(torch.cat([x, e], dim=-1))  # (B, W)
        for block in self.blocks:
            h = block(h, e)  # (B, W)
        return self.out(self.norm(h))  # (B, D)


def build_denoiser(cfg: GeneratorConfig, dim: int, cond_dim: int) -> nn.Module:
    if cfg.denoiser == "dit":
        return DiTDenoiser(dim, cond_dim, cfg.patch_size, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio,
                           cfg.token_cond, cfg.head_width)
    return MLPDenoiser(dim, cond_dim, cfg.width, cfg.depth, cfg.mlp_ratio, cfg.head_width)


# --------------------------------------------------------------------------------------- noise process


def _scheduler_args(cfg: GeneratorConfig) -> dict:
    # clip_sample off: normalised deltas are not confined to [-1, 1] as images are.
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                prediction_type=cfg.prediction_type, timestep_spacing=cfg.timestep_spacing, clip_sample=False)


def make_scheduler(cfg: GeneratorConfig, kind: str = "ddpm"):
    """A fresh diffusers scheduler for training ("ddpm") or sampling ("ddim" | "ancestral")."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        return DDIMScheduler(**_scheduler_args(cfg))
    return DDPMScheduler(**_scheduler_args(cfg))


# --------------------------------------------------------------------------------------- generator


def relative_errors(pred_delta: torch.Tensor, true_delta: torch.Tensor) -> torch.Tensor:
    """Per-row ||pred - true|| / ||true|| (denominator floored at 1e-3 of the mean norm): (N, D) x2 -> (N,)."""
    norm = true_delta.norm(dim=1)
    floor = 1e-3 * norm.mean().clamp_min(1e-12)
    return (pred_delta - true_delta).norm(dim=1) / torch.maximum(norm, floor)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    _atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise BundleError(f"{path}: unreadable tensor file: {e}") from e


def _data_hash(cond: torch.Tensor, w: torch.Tensor, w0: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (cond, w, w0):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def jitter_radius(cond: torch.Tensor, w: torch.Tensor, noise: float, gap: float, chunk: int = 4096) -> torch.Tensor:
    """(N,) the training jitter's largest size per condition: ``noise``, and with ``gap`` > 0 at most ``gap``
    times the distance from the (unit) condition to the nearest condition whose target weights differ."""
    n = cond.shape[0]
    radius = torch.full((n,), float(noise))
    if gap <= 0 or noise <= 0 or n < 2:
        return radius
    c = F.normalize(cond.float(), dim=-1)
    _, group = torch.unique(w, dim=0, return_inverse=True)  # (N,) conditions sharing target weights
    for start in range(0, n, chunk):
        sim = c[start : start + chunk] @ c.T  # (B, N)
        sim[group[start : start + chunk, None] == group[None, :]] = -1.0
        nearest = sim.max(dim=1).values.clamp(-1.0, 1.0)
        dist = (2 - 2 * nearest).clamp(min=0).sqrt()  # distance between unit vectors
        radius[start : start + chunk] = torch.minimum(radius[start : start + chunk], gap * dist)
    return radius


class WeightGenerator:
    """Learns p(w | c) from (condition, fitted weights) pairs and samples full neuron weights w."""

    def __init__(self, config: GeneratorConfig | None = None):
        self.config = dataclasses.replace(config) if config else GeneratorConfig()  # own copy: device may change
        self.model: nn.Module | None = None  # the denoiser being trained
        self.ema: nn.Module | None = None  # its EMA, used for sampling
        self.mean: torch.Tensor | None = None  # (D,) per-coordinate mean of w - w0
        self.std: torch.Tensor | None = None  # (D,) floored per-coordinate std of w - w0
        self.w0: torch.Tensor | None = None  # (D,) shared initialisation
        self.cond_dim: int | None = None  # C
        self.history: list[dict] = []  # {"step", "loss", "error", "error_max", "seconds"} per error estimate
        self.steps_trained = 0

    # ------------------------------------------------------------------ placement and shapes

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    @property
    def dim(self) -> int:
        if self.w0 is None:
            raise ConfigError("generator: not trained or loaded yet")
        return self.w0.numel()

    def to(self, device: str | torch.device) -> "WeightGenerator":
        self.config.device = str(torch.device(device))
        for name in ("model", "ema"):
            if getattr(self, name) is not None:
                getattr(self, name).to(self.device)
        for name in ("mean", "std", "w0"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(self.device))
        return self

    def _build(self, dim: int, cond_dim: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            model = build_denoiser(self.config, dim, cond_dim)
        self.model = model.to(self.device, self.dtype)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.cond_dim = cond_dim

    def normalise(self, w: torch.Tensor) -> torch.Tensor:
        """Full weights (N, D) -> normalised deltas x0 (N, D)."""
        return (w.to(self.device, self.dtype) - self.w0 - self.mean) / self.std

    def denormalise(self, x0: torch.Tensor) -> torch.Tensor:
        """Normalised deltas (N, D) -> full weights w (N, D)."""
        return self.w0 + self.mean + x0 * self.std

    def _set_stats(self, w: torch.Tensor, w0: torch.Tensor) -> None:
        delta = (w - w0).to(self.device, torch.float64)  # (N, D)
        mean = delta.mean(dim=0)
        std = delta.std(dim=0, correction=0) if delta.shape[0] > 1 else torch.zeros_like(mean)
        floor = max(self.config.std_floor * float(std.mean()), 1e-8)
        self.mean = mean.to(self.dtype)
        self.std = std.clamp_min(floor).to(self.dtype)
        self.w0 = w0.to(self.device, self.dtype)

    # ------------------------------------------------------------------ training

    def fit(self, cond: torch.Tensor, w: torch.Tensor, w0: torch.Tensor, ckpt_dir: str | Path | None = None,
            progress: bool = True, resume: bool = True, init_from: "WeightGenerator | None" = None,
            device: str | torch.device | None = None) -> list[dict]:
        """Train on pairs (cond[i], w[i]); returns the history of error estimates.

        cond (N, C) L2-normalised conditions, w (N, D) fitted weights, w0 (D,) their shared start.
        With `ckpt_dir`, a checkpoint is written every `checkpoint_every` steps and at the end; with
        `resume`, a checkpoint there (same data and settings) is continued, giving the same result as
        an uninterrupted run. `init_from` warm-starts from a trained generator (e.g. before edits were
        added): its denoiser weights are loaded where names and shapes match.
        """
        cfg = self.config
        if device is not None:
            cfg.device = str(torch.device(device))
        cond, w, w0 = self._check_data(cond, w, w0)
        n, dim = w.shape
        self._set_stats(w, w0)
        x0_all = self.normalise(w)  # (N, D)
        cond_all = cond.to(self.device, self.dtype)  # (N, C)
        radius = jitter_radius(cond, w, cfg.cond_noise, cfg.cond_noise_gap)  # (N,)
        self._build(dim, cond.shape[1])
        if init_from is not None:
            self._warm_start(init_from)

        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = torch.Generator().manual_seed(cfg.seed)  # all training randomness (drawn on the CPU)
        state = {"step": 0, "history": [], "loss_sum": 0.0, "loss_count": 0}
        ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
        data_hash = _data_hash(cond, w, w0)
        if ckpt_dir is not None and resume:
            state = self._load_checkpoint(ckpt_dir, data_hash, optimizer, rng, warm=init_from is not None) or state
        self.history = state["history"]

        scheduler = make_scheduler(cfg, "ddpm")
        eval_idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.eval_size]
        eval_idx = eval_idx.sort().values
        step = state["step"]
        done = bool(self.history) and self.history[-1]["step"] == step and self.history[-1]["error"] < cfg.target_error
        start = time.perf_counter()
        bar = _progress_bar(cfg.max_steps, step, progress)
        self.model.train()
        while step < cfg.max_steps and not done:
            loss = self._train_step(scheduler, optimizer, rng, x0_all, cond_all, radius, step)
            step += 1
            state["loss_sum"] += loss
            state["loss_count"] += 1
            if step % cfg.eval_every == 0:
                entry = self._estimate(state, step, eval_idx, cond_all, w, start)
                done = entry["error"] < cfg.target_error
                bar.set_postfix(loss=f"{entry['loss']:.4f}", err=f"{entry['error']:.3f}")
            bar.update(1)
            if ckpt_dir is not None and step % cfg.checkpoint_every == 0:
                self._save_checkpoint(ckpt_dir, data_hash, optimizer, rng, state, step)
        bar.close()
        if ckpt_dir is not None and (step % cfg.checkpoint_every or step == 0):
            self._save_checkpoint(ckpt_dir, data_hash, optimizer, rng, state, step)
        if not self.history or self.history[-1]["step"] != step:
            # a final estimate for the record; it is not part of the resumable state
            final = self._estimate(dict(state), step, eval_idx, cond_all, w, start, keep=False)
            self.history.append({**final, "final": True})
        self.steps_trained = step
        self.model.eval()
        return self.history

    def _check_data(self, cond, w, w0):
        if cond.ndim != 2 or w.ndim != 2 or w0.ndim != 1:
            raise ConfigError(f"generator: expected cond (N, C), w (N, D), w0 (D,); got {tuple(cond.shape)}, "
                              f"{tuple(w.shape)}, {tuple(w0.shape)}")
        if cond.shape[0] != w.shape[0] or w.shape[1] != w0.shape[0] or w.shape[0] == 0:
            raise ConfigError(f"generator: mismatched training data: cond {tuple(cond.shape)}, w {tuple(w.shape)}, "
                              f"w0 {tuple(w0.shape)}")
        for name, t in (("cond", cond), ("w", w), ("w0", w0)):
            if not torch.isfinite(t).all():
                raise ConfigError(f"generator: training data '{name}' has non-finite values")
        return cond.detach().float().cpu(), w.detach().float().cpu(), w0.detach().float().cpu()

    def _lr(self, step: int) -> float:
        cfg = self.config
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
            return cfg.lr * warm
        # cosine from lr at the end of warm-up to lr_min_ratio * lr at max_steps (held there if training goes on)
        progress = min(1.0, (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1))
        low = cfg.lr_min_ratio
        return cfg.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))

    def _train_step(self, scheduler, optimizer, rng, x0_all, cond_all, radius, step: int) -> float:
        cfg = self.config
        n = x0_all.shape[0]
        if cfg.batch_size < n:
            idx = torch.randperm(n, generator=rng)[: cfg.batch_size]
        else:
            idx = torch.arange(n)
        b = idx.numel()
        t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=rng)  # (B,)
        noise = torch.randn(b, x0_all.shape[1], generator=rng).to(self.device, self.dtype)  # (B, D)
        drop = (torch.rand(b, generator=rng) < cfg.cond_dropout).to(self.device)  # (B,)
        idx, t = idx.to(self.device), t.to(self.device)
        x0, cond = x0_all[idx], cond_all[idx]  # (B, D), (B, C)
        if cfg.cond_noise > 0:
            c_dim = cond.shape[1]
            direction = torch.randn(b, c_dim, generator=rng)  # (B, C)
            jitter = direction * torch.rand(b, 1, generator=rng) * radius[idx.cpu(), None] / c_dim**0.5  # (B, C)
            cond = F.normalize(cond + jitter.to(self.device, self.dtype), dim=1)  # (B, C)
        xt = scheduler.add_noise(x0, noise, t)  # (B, D)
        if cfg.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)
        else:
            target = noise if cfg.prediction_type == "epsilon" else x0
        per_row = (self.model(xt, t, cond, drop).float() - target.float()).pow(2).mean(dim=1)  # (B,)
        loss = (self._loss_weight(scheduler, t) * per_row).mean()
        for group in optimizer.param_groups:
            group["lr"] = self._lr(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short memory at the start
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        return loss.item()

    def _loss_weight(self, scheduler, t: torch.Tensor) -> torch.Tensor:
        """Per-row weight turning the loss of prediction_type into the chosen weighting in x0 space: (B,)."""
        cfg = self.config
        if cfg.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        abar = scheduler.alphas_cumprod.to(t.device)[t].double()
        snr = abar / (1 - abar)
        x0_weight = torch.ones_like(snr) if cfg.loss_weighting == "x0" else snr.clamp_max(cfg.min_snr_gamma)
        native = {"v_prediction": snr + 1, "epsilon": snr, "sample": torch.ones_like(snr)}[cfg.prediction_type]
        return (x0_weight / native).float()

    def _estimate(self, state: dict, step: int, eval_idx, cond_all, w, start: float, keep: bool = True) -> dict:
        """Mean relative L2 error of EMA samples (few DDIM steps) on the fixed subset of training pairs."""
        cfg = self.config
        x = self._sample_normalised(self.ema, cond_all[eval_idx.to(self.device)], cfg.eval_steps, "ddim", seed=0,
                                    guidance_scale=cfg.guidance_scale)
        true_delta = (w[eval_idx] - self.w0.cpu()).float()
        errors = relative_errors((self.denormalise(x) - self.w0).float().cpu(), true_delta)
        loss = state["loss_sum"] / max(state["loss_count"], 1)
        entry = {"step": step, "loss": loss, "error": float(errors.mean()), "error_max": float(errors.max()),
                 "seconds": time.perf_counter() - start}
        if keep:
            self.history.append(entry)
            state["loss_sum"], state["loss_count"] = 0.0, 0
        return entry

    def _warm_start(self, other: "WeightGenerator") -> None:
        if other.ema is None:
            raise ConfigError("generator: init_from is not trained")
        if other.config.denoiser != self.config.denoiser:
            raise ConfigError(f"generator: init_from uses denoiser {other.config.denoiser!r}, "
                              f"this config {self.config.denoiser!r}")
        if other.dim != self.dim or other.cond_dim != self.cond_dim:
            raise ConfigError(f"generator: init_from has dims (D={other.dim}, C={other.cond_dim}), "
                              f"the data (D={self.dim}, C={self.cond_dim})")
        own = self.model.state_dict()
        matching = {k: v for k, v in other.ema.state_dict().items() if k in own and own[k].shape == v.shape}
        if not matching:
            raise ConfigError("generator: init_from shares no weights with this architecture")
        if len(matching) < len(own):
            warnings.warn(f"generator warm start: {len(own) - len(matching)} of {len(own)} tensors do not match "
                          "and keep their fresh initialisation")
        self.model.load_state_dict(matching, strict=False)
        self.ema.load_state_dict(self.model.state_dict())

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, ckpt_dir: Path, data_hash: str, optimizer, rng, state: dict, step: int) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        for i, slots in optimizer.state_dict()["state"].items():
            tensors |= {f"optim.{i}.{name}": torch.as_tensor(v) for name, v in slots.items()}
        tensors["rng"] = rng.get_state()
        name = f"step-{step:07d}.safetensors"
        _atomic_save_tensors(ckpt_dir / name, tensors)
        pointer = {"file": name, "sha256": file_sha256(ckpt_dir / name), "step": step, "data": data_hash,
                   "config": asdict(self.config), "history": state["history"],
                   "loss_sum": state["loss_sum"], "loss_count": state["loss_count"]}
        _atomic_write_bytes(ckpt_dir / CKPT_POINTER, json.dumps(pointer, indent=1).encode())
        for old in ckpt_dir.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink()

    def _load_checkpoint(self, ckpt_dir: Path, data_hash: str, optimizer, rng, warm: bool = False) -> dict | None:
        pointer_path = ckpt_dir / CKPT_POINTER
        if not pointer_path.is_file():
            return None
        try:
            pointer = json.loads(pointer_path.read_text())
        except ValueError as e:
            raise BundleError(f"{pointer_path}: corrupted checkpoint pointer: {e}") from e
        if pointer.get("data") != data_hash or not self._compatible(pointer.get("config", {})):
            start = "the warm start" if warm else "scratch"
            warnings.warn(f"{ckpt_dir}: checkpoint is for other data or settings; not resumed, training from {start}")
            return None
        path = ckpt_dir / pointer["file"]
        if not path.is_file() or file_sha256(path) != pointer["sha256"]:
            raise BundleError(f"{path}: checkpoint missing or does not match its sha256 (truncated or changed)")
        tensors = _load_tensors(path)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        slots: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                slots.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": slots, "param_groups": optimizer.state_dict()["param_groups"]})
        rng.set_state(tensors["rng"])
        history = [h for h in pointer["history"] if not h.get("final")]
        return {"step": pointer["step"], "history": history, "loss_sum": pointer["loss_sum"],
                "loss_count": pointer["loss_count"]}

    def _compatible(self, saved: dict) -> bool:
        """Whether a checkpoint's settings continue this run (settings it predates count at their old values)."""
        mine = asdict(self.config)
        saved = {**_PREDATING, **saved}
        return all(saved.get(k) == v for k, v in mine.items() if k not in _RUN_ONLY_FIELDS)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int | None = None, sampler: str | None = None, seed: int = 0,
               batch_size: int = 256, guidance_scale: float | None = None) -> torch.Tensor:
        """Full weights w = w0 + delta for conditions (M, C) -> (M, D), on the device of `cond`."""
        cfg = self.config
        if self.ema is None:
            raise ConfigError("generator: not trained or loaded yet")
        steps = cfg.sample_steps if steps is None else steps
        sampler = cfg.sampler if sampler is None else sampler
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        if sampler not in SAMPLERS:
            raise ConfigError(f"generator: bad value for 'sampler': {sampler!r} ({' | '.join(SAMPLERS)})")
        if not isinstance(steps, int) or not 1 <= steps <= cfg.num_train_timesteps:
            raise ConfigError(f"generator: bad value for 'steps': {steps!r} (1..{cfg.num_train_timesteps})")
        if cond.ndim != 2 or cond.shape[1] != self.cond_dim:
            raise ConfigError(f"generator: conditions must be (M, {self.cond_dim}), got {tuple(cond.shape)}")
        out = []
        for chunk in cond.split(batch_size):
            x = self._sample_normalised(self.ema, chunk.to(self.device, self.dtype), steps, sampler, seed, scale)
            out.append(self.denormalise(x).to(cond.device, torch.float32))
        return torch.cat(out) if out else torch.empty(0, self.dim, device=cond.device)

    def _sample_normalised(self, model: nn.Module, cond: torch.Tensor, steps: int, sampler: str, seed: int,
                           guidance_scale: float) -> torch.Tensor:
        """Run the reverse process from seeded noise; returns normalised deltas (M, D)."""
        m = cond.shape[0]
        scheduler = make_scheduler(self.config, "ddim" if sampler == "ddim" else "ddpm")
        scheduler.set_timesteps(steps)
        rng = torch.Generator().manual_seed(seed)
        # one noise vector for all rows: a query's sample does not depend on the rest of the batch
        x = torch.randn(1, self.dim, generator=rng).to(self.device, self.dtype).expand(m, -1).contiguous()  # (M, D)
        guided = guidance_scale != 1.0
        cond_in = torch.cat([cond, cond]) if guided else cond  # (M or 2M, C)
        drop = torch.arange(cond_in.shape[0], device=self.device) >= m if guided else None
        was_training = model.training
        model.eval()
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if guided else x
            t_in = torch.full((x_in.shape[0],), int(t), device=self.device)
            out = model(x_in, t_in, cond_in, drop)  # (M or 2M, D)
            if guided:
                out_c, out_u = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            if sampler == "ddim":
                x = scheduler.step(out, t, x, eta=0.0).prev_sample
            else:
                x = scheduler.step(out, t, x, generator=rng).prev_sample
        model.train(was_training)
        return x

    # ------------------------------------------------------------------ persistence

    def save(self, out_dir: str | Path) -> Path:
        """Write config, EMA denoiser, statistics and w0, plus a sha256 manifest written last."""
        if self.ema is None:
            raise ConfigError("generator: nothing to save, not trained yet")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_FILE).unlink(missing_ok=True)  # the bundle is incomplete until the manifest is back
        tensors = {f"denoiser.{k}": v for k, v in self.ema.state_dict().items()}
        tensors |= {"mean": self.mean, "std": self.std, "w0": self.w0}
        _atomic_save_tensors(out / WEIGHTS_FILE, tensors)
        meta = {"format": FORMAT_VERSION, "config": asdict(self.config), "dim": self.dim, "cond_dim": self.cond_dim,
                "steps_trained": self.steps_trained, "history": self.history}
        _atomic_write_bytes(out / CONFIG_FILE, json.dumps(meta, indent=1).encode())
        manifest = {"files": {name: file_sha256(out / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}}
        _atomic_write_bytes(out / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        return out

    @classmethod
    def load(cls, in_dir: str | Path, device: str | torch.device | None = None) -> "WeightGenerator":
        """Read a saved generator; a missing, truncated or changed file raises BundleError."""
        src = Path(in_dir)
        manifest_path = src / MANIFEST_FILE
        if not manifest_path.is_file():
            raise BundleError(f"{src}: not a complete generator (no {MANIFEST_FILE})")
        try:
            expected = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError) as e:
            raise BundleError(f"{manifest_path}: corrupted manifest: {e}") from e
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (src / name).is_file() or file_sha256(src / name) != expected.get(name):
                raise BundleError(f"{src / name}: missing or does not match the manifest (truncated or changed)")
        meta = json.loads((src / CONFIG_FILE).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise BundleError(f"{src / CONFIG_FILE}: unknown format {meta.get('format')!r}")
        config = GeneratorConfig.from_dict({**_PREDATING, **meta["config"]})
        if device is not None:
            config.device = str(torch.device(device))
        gen = cls(config)
        gen._build(meta["dim"], meta["cond_dim"])
        tensors = _load_tensors(src / WEIGHTS_FILE)
        gen.ema.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("denoiser.")})
        gen.model.load_state_dict(gen.ema.state_dict())
        gen.model.eval()
        gen.mean, gen.std, gen.w0 = (tensors[k].to(gen.device, gen.dtype) for k in ("mean", "std", "w0"))
        gen.history, gen.steps_trained = meta.get("history", []), meta.get("steps_trained", 0)
        return gen


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="generator", unit="step", dynamic_ncols=True)
