"""An independent plain-PyTorch reference of (Skip-)DiT, Skip-Cache and ADM diffusion.

This module is the oracle of the parity tests. It is written from the description of the
official Skip-DiT / DiT code in `shared/reference/official-skip-dit.md` (sections 0, 1.1, 2
and the class-to-image sampler notes) and deliberately shares no code with `skipdit_jax`:

* `TorchDiT` has exactly the official state-dict key names and shapes (section 1.1), so a
  `state_dict()` of it *is* an official-layout checkpoint (bare, vanilla DiT or DiT-skip).
* `TorchDiT.enable_cache(...)` reproduces the module-held schedule of the official
  `DiT_cache` (section 2): counter `cache_cont`, `cache_val`, `skip_at_branch = k`.
* `ADMDiffusion` is the ADM/DiT `GaussianDiffusion` + `SpacedDiffusion` maths (linear betas,
  learned-range variance, epsilon prediction), in numpy float64.
* `ddim_sample_loop` / `ddpm_sample_loop` are the official sampling loops (CFG batch
  [cond; uncond], the model called with the ORIGINAL timestep), with explicit noise.

The test-only helper `randomize_parameters_` re-draws every parameter (except the frozen
`pos_embed`) so that the zero-initialised adaLN / final layers cannot hide bugs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE 1-D sincos: `[sin(pos*omega), cos(pos*omega)]`, omega_i = 1/10000^(i/(dim/2))."""
    if dim % 2:
        raise ValueError(f"sincos embedding needs an even width, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """MAE 2-D sincos position embedding, (grid_size**2, dim), float64.

    Tokens are in row-major (row, col) order. `grid = meshgrid(w, h)`, so grid[0] holds the
    column index: the first dim/2 channels encode the column, the last dim/2 the row.
    """
    if dim % 4:
        raise ValueError(f"2-D sincos embedding needs a width divisible by 4, got {dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    col, row = np.meshgrid(coords, coords)  # meshgrid(w, h): col varies along axis 1
    return np.concatenate([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], axis=1)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT sinusoidal timestep features, `[cos(t f), sin(t f)]` (cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,C,H,W) -> (B,T,D), row-major tokens
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # last row: null label

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """timm-style attention: fused qkv -> (B,N,3,H,hd), scale hd^-0.5, then proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B,H,N,hd)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block; the two LayerNorms have no parameters (eps 1e-6)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LN (no affine) modulated by (shift, scale) -- no gate -- then Linear(D, p*p*out)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class FP32LayerNorm(nn.LayerNorm):
    """Affine LayerNorm computed in float32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SkipLinear(nn.Module):
    """`ResidualLinear`: despite the official name there is NO residual -- the output replaces x."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class TorchDiT(nn.Module):
    """DiT (`long_skip=False`) / DiT-skip (`long_skip=True`) with the official key layout.

    `forward(x_nchw, t, y)`: t on the original 0..999 scale, y class ids (num_classes = null).
    With `enable_cache(...)` it behaves like the official `DiT_cache` (module-held state).
    """

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        long_skip: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError("input_size must be divisible by patch_size")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.long_skip = long_skip

        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        pos = torch.from_numpy(sincos_2d_pos_embed(hidden_size, grid)).float()[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # frozen but in the state dict
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        if long_skip:
            n_skip = depth // 2
            self.skip_norms = nn.ModuleList(
                [FP32LayerNorm(2 * hidden_size, eps=1e-6, elementwise_affine=True) for _ in range(n_skip)]
            )
            self.skip_linears = nn.ModuleList([SkipLinear(2 * hidden_size, hidden_size) for _ in range(n_skip)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

        # Skip-Cache state (official DiT_cache semantics); disabled by default.
        self.cache_enabled = False
        self.cache_interval = 1
        self.skip_at_branch = 0
        self.cache_start_t = 1000
        self.cache_close_t = 20
        self.reset_cache_state()
        self.reset_counters()

    # ---- cache control ---------------------------------------------------------------------
    def enable_cache(self, interval: int, shallow_blocks: int, start_t: int = 1000, close_t: int = 20):
        if not 1 <= shallow_blocks <= self.depth // 2:
            raise ValueError(f"shallow_blocks must be in 1..{self.depth // 2}, got {shallow_blocks}")
        if interval < 1:
            raise ValueError("interval must be >= 1")
        self.cache_enabled = True
        self.cache_interval = interval
        self.skip_at_branch = shallow_blocks
        self.cache_start_t = start_t
        self.cache_close_t = close_t
        self.reset_cache_state()
        return self

    def disable_cache(self):
        self.cache_enabled = False
        self.reset_cache_state()
        return self

    def reset_cache_state(self):
        self.cache_val: torch.Tensor | None = None
        self.cache_cont = 0

    def reset_counters(self):
        self.n_full = 0
        self.n_cached = 0
        self.schedule: list[bool] = []  # True = full forward, per forward call

    # ---- forward -----------------------------------------------------------------------------
    def _fuse(self, x: torch.Tensor, skip: torch.Tensor, block_index: int) -> torch.Tensor:
        j = block_index - self.depth // 2
        return self.skip_linears[j](self.skip_norms[j](torch.cat([x, skip], dim=-1)))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        h = w = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        y = torch.as_tensor(y, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)

        cur_t = float(t.reshape(-1)[0])
        k = self.skip_at_branch
        mid = self.depth // 2
        if self.cache_enabled:
            full = (self.cache_cont % self.cache_interval == 0) or self.cache_val is None or cur_t >= self.cache_start_t
        else:
            full = True

        skips: list[torch.Tensor] = []
        if full:
            for i, block in enumerate(self.blocks):
                if self.cache_enabled and i == self.depth - k:
                    self.cache_val = h  # the state entering block depth-k, before its fusion
                if self.long_skip and i >= mid:
                    h = self._fuse(h, skips.pop(), i)
                h = block(h, c)
                if self.long_skip and i < mid:
                    skips.append(h)
        else:
            for i in range(k):
                h = self.blocks[i](h, c)
                if self.long_skip:
                    skips.append(h)
            h = self.cache_val
            for i in range(self.depth - k, self.depth):
                if self.long_skip:
                    h = self._fuse(h, skips.pop(), i)
                h = self.blocks[i](h, c)
        out = self.unpatchify(self.final_layer(h, c))

        self.schedule.append(bool(full))
        if full:
            self.n_full += 1
        else:
            self.n_cached += 1
        if self.cache_enabled:
            self.cache_cont += 1
            if cur_t <= self.cache_close_t:
                self.reset_cache_state()
        return out

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, cfg_channels: int | None = None
    ) -> torch.Tensor:
        """Official DiT CFG: batch [cond; uncond]; guidance on the first `cfg_channels` channels.

        `cfg_channels=None` guides all eps channels (in_channels); 3 is the official DiT quirk.
        The remaining channels come unguided from each half.
        """
        n = cfg_channels if cfg_channels is not None else self.in_channels
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        out = self.forward(combined, t, y)
        eps, rest = out[:, :n], out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


@torch.no_grad()
def randomize_parameters_(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Re-draw every parameter with a fixed seed (pos_embed kept): no zero-init hides bugs.

    Linear/conv/embedding weights and biases: N(0, scale^2). Affine norm weights: 1 + N(0, 0.1^2).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name == "pos_embed":
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "skip_norms" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(scale * noise)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            p.requires_grad_(False)
    return model


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# ADM diffusion (numpy float64)
# --------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """ADM `space_timesteps`: which original timesteps a respaced process keeps."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(s) for s in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac_stride
        start += size
    return set(kept)


class ADMDiffusion:
    """ADM GaussianDiffusion respaced to `respacing` ("250", "10,10,5", "ddim50", ...).

    Indices i = 0..num_timesteps-1 address the respaced process; `timestep_map[i]` is the
    original timestep the model is called with. Variance: learned range when the model output
    has 2C channels, else ADM FIXED_LARGE. Arrays are in NCHW by default (`channel_axis`).
    """

    def __init__(self, respacing: str | Sequence[int] = "250", num_train_timesteps: int = 1000):
        base_betas = linear_betas(num_train_timesteps)
        base_abar = np.cumprod(1.0 - base_betas)
        use = space_timesteps(num_train_timesteps, respacing)
        betas, tmap, last = [], [], 1.0
        for i, abar in enumerate(base_abar):
            if i in use:
                betas.append(1.0 - abar / last)
                last = abar
                tmap.append(i)
        self.timestep_map = np.asarray(tmap, dtype=np.int64)
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        ) if self.num_timesteps > 1 else np.log(self.betas)
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # -- one-step maths --
    def predict_xstart_from_eps(self, x, i, eps):
        return self.sqrt_recip_alphas_cumprod[i] * x - self.sqrt_recipm1_alphas_cumprod[i] * eps

    def predict_eps_from_xstart(self, x, i, xstart):
        return (self.sqrt_recip_alphas_cumprod[i] * x - xstart) / self.sqrt_recipm1_alphas_cumprod[i]

    def p_mean_variance(self, model_out, x, i: int, channel_axis: int = 1) -> dict[str, np.ndarray]:
        model_out = np.asarray(model_out, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        c = x.shape[channel_axis]
        if model_out.shape[channel_axis] == 2 * c:
            eps, v = np.split(model_out, 2, axis=channel_axis)
            min_log = self.posterior_log_variance_clipped[i]
            max_log = np.log(self.betas[i])
            frac = (v + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        else:  # FIXED_LARGE
            eps = model_out
            large = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas
            log_var = np.full_like(x, np.log(large[i]))
        pred_xstart = self.predict_xstart_from_eps(x, i, eps)
        mean = self.posterior_mean_coef1[i] * pred_xstart + self.posterior_mean_coef2[i] * x
        return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

    def ddpm_step(self, model_out, x, i: int, noise, channel_axis: int = 1) -> np.ndarray:
        """ADM p_sample: mean + (i != 0) * exp(0.5 log_var) * noise."""
        out = self.p_mean_variance(model_out, x, i, channel_axis)
        nonzero = 1.0 if i != 0 else 0.0
        return out["mean"] + nonzero * np.exp(0.5 * out["log_variance"]) * np.asarray(noise, dtype=np.float64)

    def ddim_step(self, model_out, x, i: int, eta: float = 0.0, noise=None, channel_axis: int = 1) -> np.ndarray:
        """ADM ddim_sample (eps recomputed from pred_xstart)."""
        out = self.p_mean_variance(model_out, x, i, channel_axis)
        x = np.asarray(x, dtype=np.float64)
        eps = self.predict_eps_from_xstart(x, i, out["pred_xstart"])
        abar, abar_prev = self.alphas_cumprod[i], self.alphas_cumprod_prev[i]
        sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar)) * np.sqrt(1.0 - abar / abar_prev)
        mean = out["pred_xstart"] * np.sqrt(abar_prev) + np.sqrt(1.0 - abar_prev - sigma**2) * eps
        if i != 0 and sigma != 0.0:
            if noise is None:
                raise ValueError("eta > 0 needs explicit noise")
            mean = mean + sigma * np.asarray(noise, dtype=np.float64)
        return mean


def create_diffusion(respacing: str | Sequence[int] = "250") -> ADMDiffusion:
    return ADMDiffusion(respacing)


# --------------------------------------------------------------------------------------------
# Sampling loops (official DiT sample.py semantics)
# --------------------------------------------------------------------------------------------


def _model_fn(model: TorchDiT, cfg_scale: float, cfg_channels: int | None) -> Callable:
    if cfg_scale != 1.0:
        return lambda x, t, y: model.forward_with_cfg(x, t, y, cfg_scale, cfg_channels)
    return model.forward


@torch.no_grad()
def _sample_loop(model: TorchDiT, diffusion: ADMDiffusion, noise, labels, cfg_scale, cfg_channels, step_fn):
    model.eval()
    model.reset_cache_state()
    model.reset_counters()
    x = np.asarray(noise, dtype=np.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    use_cfg = cfg_scale != 1.0
    if use_cfg:
        x = np.concatenate([x, x], axis=0)
        y = torch.cat([y, torch.full_like(y, model.num_classes)])
    fn = _model_fn(model, cfg_scale, cfg_channels)
    for step, i in enumerate(reversed(range(diffusion.num_timesteps))):
        t = torch.full((x.shape[0],), int(diffusion.timestep_map[i]), dtype=torch.long)
        out = fn(torch.from_numpy(x).float(), t, y).double().numpy()
        x = step_fn(out, x, i, step, use_cfg)
    return x[: len(x) // 2] if use_cfg else x


def ddim_sample_loop(model, noise, labels, num_steps, cfg_scale=1.0, cfg_channels=None, eta=0.0, noises=None):
    """ADM ddim_sample_loop on "ddim{num_steps}"; NCHW numpy in, NCHW float64 numpy out."""
    diffusion = create_diffusion(f"ddim{num_steps}")

    def step_fn(out, x, i, step, use_cfg):
        n = None
        if eta != 0.0:
            n = np.asarray(noises[step], dtype=np.float64)
            n = np.concatenate([n, n]) if use_cfg else n
        return diffusion.ddim_step(out, x, i, eta=eta, noise=n)

    return _sample_loop(model, diffusion, noise, labels, cfg_scale, cfg_channels, step_fn)


def ddpm_sample_loop(model, noise, labels, section_counts, cfg_scale=1.0, cfg_channels=None, noises=None):
    """ADM p_sample_loop on `section_counts`; `noises[k]` is the noise of the k-th step taken
    (k=0 is the first, noisiest step), shape of `noise`; with CFG it is used for both halves."""
    diffusion = create_diffusion(section_counts)
    if noises is None or len(noises) != diffusion.num_timesteps:
        raise ValueError(f"need {diffusion.num_timesteps} per-step noises")

    def step_fn(out, x, i, step, use_cfg):
        n = np.asarray(noises[step], dtype=np.float64)
        n = np.concatenate([n, n]) if use_cfg else n
        return diffusion.ddpm_step(out, x, i, n)

    return _sample_loop(model, diffusion, noise, labels, cfg_scale, cfg_channels, step_fn)


def cache_schedule(timesteps: Sequence[int], interval: int, start_t: int = 1000, close_t: int = 20) -> list[bool]:
    """The official DiT_cache full(True)/cached(False) schedule for a list of model timesteps."""
    full, cont, has_cache = [], 0, False
    for t in timesteps:
        f = cont % interval == 0 or not has_cache or t >= start_t
        full.append(f)
        has_cache = has_cache or f
        cont += 1
        if t <= close_t:
            cont, has_cache = 0, False
    return full


# --------------------------------------------------------------------------------------------
# pytorch-fid (the Inception reference)
# --------------------------------------------------------------------------------------------


def import_pytorch_fid_inception():
    """The `pytorch_fid.inception` module. torchvision, which it imports, is made importable
    beside torch+cpu by tests/conftest.py (see `_import_torchvision_without_its_compiled_ops`
    there for why)."""
    import pytorch_fid.inception

    return pytorch_fid.inception


# --------------------------------------------------------------------------------------------
# Latte / Latte-skip (class-to-video), official `class-to-video/models/latte.py` semantics
# --------------------------------------------------------------------------------------------


def sincos_1d_temp_embed(dim: int, length: int) -> np.ndarray:
    """Latte's `get_1d_sincos_temp_embed`: the MAE 1-D table of frame indices 0..length-1."""
    return _sincos_1d(dim, np.arange(length, dtype=np.float64))


class TorchLatte(nn.Module):
    """Latte (`long_skip=False`) / Latte_skip (`long_skip=True`) with the official key layout
    (section 1.2): `blocks` alternate spatial (even) and temporal (odd); `temp_embed` is added
    after the spatial block of pair 0; skip module j serves pair P/2 + j and fuses the output of
    pair P/2 - 1 - j (LIFO). `num_classes=0` is the unconditional (extras=1) model: no
    y_embedder. `forward(x (B, F, C, H, W), t, y) -> (B, F, out, H, W)`.

    `forward(x, t, y, use_image_num=I, y_image=None)` is the joint image-video forward of the
    official `latte_img.py` (training mode): the last I of the input frames are images; after
    every spatial block they are split off the (b t) f d layout, skip temp_embed and the
    temporal block, and are concatenated back behind the video frames; spatial blocks and the
    final layer condition image j on t_emb + y_emb(y_image[:, j]) (y by default).

    With `enable_cache(interval, pairs)` it behaves like the official `Latte_skip_cache`
    (module-held state; full when cache_cont % N == 0, no cache, or t >= start_t; the cache is
    dropped after a step with t < close_t; the cache holds the input of pair P-k).
    """

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_frames: int = 16,
        num_classes: int = 101,
        learn_sigma: bool = True,
        long_skip: bool = False,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.depth = depth
        self.num_frames = num_frames
        self.num_classes = num_classes
        self.long_skip = long_skip
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d_pos_embed(hidden_size, grid)).float()[None], requires_grad=False)
        self.temp_embed = nn.Parameter(
            torch.from_numpy(sincos_1d_temp_embed(hidden_size, num_frames)).float()[None], requires_grad=False
        )
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        if long_skip:
            n_skip = depth // 4
            self.skip_norms = nn.ModuleList(
                [FP32LayerNorm(2 * hidden_size, eps=1e-6, elementwise_affine=True) for _ in range(n_skip)]
            )
            self.skip_linears = nn.ModuleList([SkipLinear(2 * hidden_size, hidden_size) for _ in range(n_skip)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.cache_enabled = False
        self.reset_cache_state()
        self.reset_counters()

    def enable_cache(self, interval: int, pairs: int = 1, start_t: int = 900, close_t: int = 50):
        self.cache_enabled, self.cache_interval, self.skip_at_branch = True, interval, pairs
        self.cache_start_t, self.cache_close_t = start_t, close_t
        self.reset_cache_state()
        return self

    def reset_cache_state(self):
        self.cache_val = None
        self.cache_cont = 0

    def reset_counters(self):
        self.n_full = 0
        self.n_cached = 0

    def _pair(self, x, i, b, c_s, c_t, skips, n_img=0):
        """Blocks i (spatial) and i+1 (temporal) on x in the (b f) t d layout; the last
        `n_img` frames of each sample are images, which bypass the temporal block."""
        n_blocks = len(self.blocks)
        if self.long_skip and i >= n_blocks // 2:
            j = (i - n_blocks // 2) // 2  # = (i - 14) // 2 at 28 blocks
            x = self.skip_linears[j](self.skip_norms[j](torch.cat([x, skips.pop()], dim=-1)))
        x = self.blocks[i](x, c_s)
        bf, n, d = x.shape
        f = bf // b
        x = x.reshape(b, f, n, d).permute(0, 2, 1, 3).reshape(b * n, f, d)  # (b t) f d
        x_video, x_image = x[:, : f - n_img], x[:, f - n_img :]
        if i == 0:
            x_video = x_video + self.temp_embed
        x_video = self.blocks[i + 1](x_video, c_t)
        x = torch.cat([x_video, x_image], dim=1)
        x = x.reshape(b, n, f, d).permute(0, 2, 1, 3).reshape(b * f, n, d)
        if self.long_skip and i < n_blocks // 2:
            skips.append(x)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None, use_image_num: int = 0, y_image=None) -> torch.Tensor:
        t = torch.as_tensor(t)
        b, f, ch, hh, ww = x.shape
        h = self.x_embedder(x.reshape(b * f, ch, hh, ww)) + self.pos_embed
        t_emb = self.t_embedder(t)
        c = t_emb
        if self.num_classes:
            c = t_emb + self.y_embedder(torch.as_tensor(y, dtype=torch.long))
        n = h.shape[1]
        c_s = c.repeat_interleave(f, dim=0)  # 'n d -> (n c) d'
        if use_image_num and y_image is not None:
            per_frame = c[:, None].repeat(1, f, 1)  # b f d
            per_frame[:, f - use_image_num :] = t_emb[:, None] + self.y_embedder(torch.as_tensor(y_image, dtype=torch.long))
            c_s = per_frame.reshape(b * f, -1)
        c_t = c.repeat_interleave(n, dim=0)
        cur_t = float(t.reshape(-1)[0])
        n_blocks = len(self.blocks)
        k = getattr(self, "skip_at_branch", 0)
        full = True
        if self.cache_enabled:
            full = self.cache_cont % self.cache_interval == 0 or self.cache_val is None or cur_t >= self.cache_start_t
        skips: list[torch.Tensor] = []
        if full:
            for i in range(0, n_blocks, 2):
                if self.cache_enabled and i == n_blocks - 2 * k:
                    self.cache_val = h
                h = self._pair(h, i, b, c_s, c_t, skips, use_image_num)
            self.n_full += 1
        else:
            for i in range(0, n_blocks, 2):
                if 2 * k <= i < n_blocks - 2 * k:
                    continue
                if i == n_blocks - 2 * k:
                    h = self.cache_val
                h = self._pair(h, i, b, c_s, c_t, skips)
            self.n_cached += 1
        if self.cache_enabled:
            self.cache_cont += 1
            if cur_t < self.cache_close_t:
                self.reset_cache_state()
        out = self.final_layer(h, c_s)
        p, oc = self.patch_size, self.out_channels
        g = hh // p
        out = out.reshape(b * f, g, g, p, p, oc)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(b, f, oc, hh, ww)
        return out


def latte_cache_schedule(timesteps: Sequence[int], interval: int, start_t: int = 900, close_t: int = 50) -> list[bool]:
    """The official `Latte_skip_cache` full(True)/cached(False) schedule (close: `t < close_t`)."""
    full, cont, has_cache = [], 0, False
    for t in timesteps:
        f = cont % interval == 0 or not has_cache or t >= start_t
        full.append(f)
        has_cache = has_cache or f
        cont += 1
        if t < close_t:
            cont, has_cache = 0, False
    return full


@torch.no_grad()
def randomize_latte_parameters_(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """`randomize_parameters_` for Latte: the frozen pos_embed and temp_embed are kept."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in ("pos_embed", "temp_embed"):
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        p.copy_(1.0 + 0.1 * noise if "skip_norms" in name and name.endswith("weight") else scale * noise)
    return model
