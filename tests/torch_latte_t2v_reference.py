"""An independent PyTorch reference of the official Skip-DiT text-to-video model
(`text-to-video/models/latte_t2v_skip.py`, `LatteT2V_skip`, and its cached twin
`latte_t2v_skip_cache.py`, `LatteT2V_skip_cache`), written from the official code's
behaviour and composed of diffusers' blocks (as the official model is).

`forward` is the inference path; `forward_joint` the training pass with joint images
(`use_image_num` > 0, the official training branch: gradient checkpointing on, which adds the
frame table to the video frames at pair 0). Module and key names are the official ones, so its
state dict is a `Latte-skip.pt` "ema" dict: `pos_embed`, `transformer_blocks` (diffusers
`BasicTransformerBlock`, ada_norm_single, self + cross attention), `temporal_transformer_blocks`
(the same without cross-attention), `skip_norms` (float32 LayerNorm over 2D, affine),
`skip_linears.{j}.linear` (no residual: the projection replaces x), `scale_shift_table`,
`proj_out`, `adaln_single`, `caption_projection`; `temp_pos_embed` is a non-persistent buffer.

Pair i >= P/2 first fuses its input with the popped output of pair P-1-i (LIFO); the frame
table is added after pair 0's spatial block when F > 1. The text mask (B, L) becomes the
additive bias (1 - mask) * -10000, repeated per frame (`b 1 l -> (b f) 1 l`).

With `enable_cache(interval, k, start_t, close_t)` it behaves like `LatteT2V_skip_cache`
with `skip_at_branch = k`: a step is full when cache_cont % interval == 0, no cache is held
or t >= start_t; a full step stores the hidden state entering pair P-k; a cached step runs
pairs 0..k-1, then pairs P-k..P-1 from the stored state with fresh skips; after a step with
t <= close_t the counter and cache are reset.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection, get_1d_sincos_pos_embed_from_grid
from diffusers.models.normalization import AdaLayerNormSingle
from torch import nn


class FP32LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResidualLinear(nn.Module):  # the official name; there is no residual
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.linear(x)


class TorchLatteT2V(nn.Module):
    """`forward(x (B, C, F, H, W), t (B,), text (B, L, caption), mask (B, L) or None)
    -> (B, out, F, H, W)`."""

    def __init__(
        self,
        num_heads,
        head_dim,
        in_channels,
        num_layers,
        sample_size,
        patch_size,
        caption_channels,
        video_length,
        learn_sigma=True,
        long_skip=True,
        norm_eps=1e-6,
    ):
        super().__init__()
        d = num_heads * head_dim
        self.patch_size, self.long_skip, self.num_layers = patch_size, long_skip, num_layers
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=d,
            interpolation_scale=max(sample_size // 64, 1),
        )

        def block(cross):
            return BasicTransformerBlock(
                d,
                num_heads,
                head_dim,
                cross_attention_dim=d if cross else None,
                activation_fn="gelu-approximate",
                attention_bias=True,
                norm_type="ada_norm_single",
                norm_elementwise_affine=False,
                norm_eps=norm_eps,
            )

        self.transformer_blocks = nn.ModuleList([block(True) for _ in range(num_layers)])
        self.temporal_transformer_blocks = nn.ModuleList([block(False) for _ in range(num_layers)])
        if long_skip:
            self.skip_norms = nn.ModuleList([FP32LayerNorm(2 * d, eps=1e-6) for _ in range(num_layers // 2)])
            self.skip_linears = nn.ModuleList([ResidualLinear(d) for _ in range(num_layers // 2)])
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.proj_out = nn.Linear(d, patch_size * patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(d)
        self.caption_projection = PixArtAlphaTextProjection(caption_channels, d)
        temp = get_1d_sincos_pos_embed_from_grid(d, torch.arange(video_length).unsqueeze(1), output_type="pt")
        self.register_buffer("temp_pos_embed", temp.float().unsqueeze(0), persistent=False)
        self.cache_enabled = False
        self.n_full = self.n_cached = 0

    def enable_cache(self, interval: int, k: int = 1, start_t: int = 700, close_t: int = 50):
        self.cache_enabled, self.cache_gap, self.skip_at_branch = True, interval, k
        self.start_t, self.close_t = start_t, close_t
        self.cache_val, self.cache_cont = None, 0
        return self

    def _pair(self, i, h, b, spatial_args, c_temp, skips):
        n = self.num_layers
        if self.long_skip and i >= n // 2:
            j = i - n // 2
            h = self.skip_linears[j](self.skip_norms[j](torch.cat([h, skips.pop()], dim=-1)))
        h = self.transformer_blocks[i](h, None, *spatial_args)
        bf, t, d = h.shape
        f = bf // b
        h = h.reshape(b, f, t, d).permute(0, 2, 1, 3).reshape(b * t, f, d)  # (b t) f d
        if i == 0 and f > 1:
            h = h + self.temp_pos_embed
        h = self.temporal_transformer_blocks[i](h, None, None, None, c_temp)
        h = h.reshape(b, t, f, d).permute(0, 2, 1, 3).reshape(b * f, t, d)
        if self.long_skip and i < n // 2:
            skips.append(h)
        return h

    def forward(self, x, t, text, mask=None):
        b, c, f, hh, ww = x.shape
        h = self.pos_embed(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, hh, ww))
        t = torch.as_tensor(t)
        mod, emb = self.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=b, hidden_dtype=h.dtype)
        context = self.caption_projection(text).repeat_interleave(f, dim=0)  # b t d -> (b f) t d
        bias = None
        if mask is not None:
            bias = ((1 - mask.to(h.dtype)) * -10000.0).unsqueeze(1).repeat_interleave(f, dim=0)  # b 1 l -> (b f) 1 l
        c_spatial = mod.repeat_interleave(f, dim=0)
        c_temp = mod.repeat_interleave(h.shape[1], dim=0)
        spatial_args = (context, bias, c_spatial)
        n, skips = self.num_layers, []
        cur_t = float(t.reshape(-1)[0])
        full = True
        if self.cache_enabled:
            full = self.cache_cont % self.cache_gap == 0 or self.cache_val is None or cur_t >= self.start_t
        if full:
            for i in range(n):
                if self.cache_enabled and i == n - self.skip_at_branch:
                    self.cache_val = h
                h = self._pair(i, h, b, spatial_args, c_temp, skips)
            self.n_full += 1
        else:
            k = self.skip_at_branch
            for i in list(range(k)) + list(range(n - k, n)):
                if i == n - k:
                    h = self.cache_val
                h = self._pair(i, h, b, spatial_args, c_temp, skips)
            self.n_cached += 1
        if self.cache_enabled:
            self.cache_cont += 1
            if cur_t <= self.close_t:
                self.cache_val, self.cache_cont = None, 0
        emb = emb.repeat_interleave(f, dim=0)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        h = self.proj_out(self.norm_out(h) * (1 + scale) + shift)
        p, oc, g = self.patch_size, self.out_channels, hh // self.patch_size
        out = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, g, g, p, p, oc)).reshape(b, f, oc, hh, ww)
        return out.permute(0, 2, 1, 3, 4)


    def forward_joint(self, x, t, text, mask, use_image_num: int):
        """The official training forward with joint images: x (B, C, F + I, H, W), the last
        I = use_image_num frames images; text (B, 1 + I, L, caption) and mask (B, 1 + I, L),
        row 0 the video's caption, row 1 + i image i's. -> (B, out, F + I, H, W)."""
        b, c, f_all, hh, ww = x.shape
        f = f_all - use_image_num
        h = self.pos_embed(x.permute(0, 2, 1, 3, 4).reshape(b * f_all, c, hh, ww))
        bias = (1 - mask.to(h.dtype)) * -10000.0
        bias = torch.cat([bias[:, :1].repeat(1, f, 1), bias[:, 1:]], dim=1).reshape(b * f_all, 1, -1)
        added = {"resolution": None, "aspect_ratio": None}
        mod, emb = self.adaln_single(torch.as_tensor(t), added, batch_size=b, hidden_dtype=h.dtype)
        context = self.caption_projection(text)  # (b, 1 + I, l, d)
        context = torch.cat([context[:, :1].repeat(1, f, 1, 1), context[:, 1:]], dim=1).reshape(b * f_all, context.shape[2], -1)
        c_spatial = mod.repeat_interleave(f_all, dim=0)
        c_temp = mod.repeat_interleave(h.shape[1], dim=0)
        n, skips = self.num_layers, []
        for i in range(n):
            if self.long_skip and i >= n // 2:
                j = i - n // 2
                h = self.skip_linears[j](self.skip_norms[j](torch.cat([h, skips.pop()], dim=-1)))
            h = self.transformer_blocks[i](h, None, context, bias, c_spatial)
            tok, d = h.shape[1:]
            h = h.reshape(b, f_all, tok, d).permute(0, 2, 1, 3).reshape(b * tok, f_all, d)  # (b t) f d
            video, images = h[:, :f], h[:, f:]
            if i == 0:
                video = video + self.temp_pos_embed
            video = self.temporal_transformer_blocks[i](video, None, None, None, c_temp)
            h = torch.cat([video, images], dim=1).reshape(b, tok, f_all, d).permute(0, 2, 1, 3).reshape(b * f_all, tok, d)
            if self.long_skip and i < n // 2:
                skips.append(h)
        emb = emb.repeat_interleave(f_all, dim=0)
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)
        h = self.proj_out(self.norm_out(h) * (1 + scale) + shift)
        p, oc, g = self.patch_size, self.out_channels, hh // self.patch_size
        out = torch.einsum("nhwpqc->nchpwq", h.reshape(-1, g, g, p, p, oc)).reshape(b, f_all, oc, hh, ww)
        return out.permute(0, 2, 1, 3, 4)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Every parameter random and non-zero: N(0, scale) (scale_shift tables N(0, 0.3), skip
    norm weights 1 + N(0, 0.1)), so zero-initialised layers take part in the comparison."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "skip_norms" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif "scale_shift_table" in name:
            p.copy_(0.3 * noise)
        else:
            p.copy_(scale * noise)
    return model


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
