"""The DiT family's configuration: one frozen dataclass for DiT and Skip-DiT, plus the
named presets; and `ArchitectureConfig`, what every family's config shares (derived sizes,
validation of the common fields, JSON), which `LatteConfig` also builds on.

A `ModelConfig` fully determines the parameter tree of `skipdit_jax.models.DiT`; it is
saved as JSON (with its family's name) next to every checkpoint so a checkpoint can be
loaded without guessing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, ClassVar

import jax.numpy as jnp

from skipdit_jax.errors import ConfigError
from skipdit_jax.models.skip import check_remat_policy

# (depth, hidden_size, num_heads) of the DiT paper's model sizes.
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
SKIP_INITS = ("torch_default", "xavier")
COMPUTE_DTYPES = ("float32", "bfloat16")


class ArchitectureConfig:
    """What the model configs of every family share (mixed into frozen dataclasses such as
    `ModelConfig` and `LatteConfig`): the derived sizes, validation of the common fields and
    the JSON (de)serialisation.

    A subclass is a frozen dataclass with at least the fields input_size, patch_size,
    in_channels, hidden_size, num_heads, mlp_ratio, num_classes, learn_sigma, skip_init,
    dtype, remat_policy and scan_unroll, and sets `family`, `config_label` (errors read
    "invalid {label} config: ..."), `positive_fields`, `skip_inits`, and adds its own rules
    in `validate_layout`. Every check raises `ConfigError` with one line; the first failing
    check wins, in the order of `validate`.
    """

    family: ClassVar[str] = ""
    config_label: ClassVar[str] = "model"
    positive_fields: ClassVar[tuple[str, ...]] = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads")
    skip_inits: ClassVar[tuple[str, ...]] = SKIP_INITS
    # Whether remat_policy is checked before mlp_ratio (the order each config always had).
    remat_before_mlp_ratio: ClassVar[bool] = True

    def __post_init__(self):
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    # ---- validation and (de)serialisation ----------------------------------------------
    def _invalid(self, msg: str):
        raise ConfigError(f"invalid {self.config_label} config: {msg}")

    def validate(self) -> None:
        bad = self._invalid
        for name in self.positive_fields:
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            bad(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            bad(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            bad(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        self.validate_layout()
        if self.num_classes < 0:
            bad(f"num_classes must be >= 0, got {self.num_classes}")
        if self.skip_init not in self.skip_inits:
            bad(f"skip_init must be one of {self.skip_inits}, got {self.skip_init!r}")
        if self.dtype not in COMPUTE_DTYPES:
            bad(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if int(self.scan_unroll) != self.scan_unroll or self.scan_unroll < 0:
            bad(f"scan_unroll must be an integer >= 0 (0 = unroll completely), got {self.scan_unroll}")
        checks = [self._check_remat, self._check_mlp_ratio]
        for check in checks if self.remat_before_mlp_ratio else checks[::-1]:
            check()

    def validate_layout(self) -> None:
        """The family's own rules (depth, long skips, frames ...), after the common sizes."""

    def _check_remat(self) -> None:
        try:
            check_remat_policy(self.remat_policy)
        except ConfigError as e:
            self._invalid(str(e))

    def _check_mlp_ratio(self) -> None:
        if self.mlp_ratio <= 0:
            self._invalid(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def upgrade_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Rewrites keys of files written by older versions (none by default)."""
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        d.pop("family", None)
        d = cls.upgrade_dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown {cls.config_label} config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class ModelConfig(ArchitectureConfig):
    """Architecture of a (Skip-)DiT.

    Attributes:
      input_size: side of the square input (latent) image, in pixels/latent cells.
      patch_size: side of the square patches that become tokens.
      in_channels: channels of the input image (4 for SD-VAE latents).
      hidden_size: token width D.
      depth: number of transformer blocks.
      num_heads: attention heads (hidden_size must be divisible by it).
      mlp_ratio: MLP hidden width / D.
      num_classes: class labels 0..num_classes-1; label `num_classes` is the null label used
        for classifier-free guidance. 0 means an unconditional model (no label table).
      learn_sigma: the model also predicts the variance interpolation (ADM "learned range"),
        doubling the output channels.
      long_skip: Skip-DiT's long skip connections (decoder block i fuses the output of
        encoder block depth-1-i).
      skip_init: initialisation of the skip-fusion Linear. "torch_default" matches the
        official class-to-image DiT_skip (kaiming-uniform(a=sqrt(5)) weight and
        U(+-1/sqrt(fan_in)) bias, because its skip modules are created after DiT's
        initialize_weights); "xavier" matches the official Latte class-to-video code
        (xavier-uniform weight, zero bias).
      dtype: compute dtype ("float32" or "bfloat16"); parameters always stay float32 and
        layer norms, the timestep embedding and the output are computed in float32.
      attention_impl: passed to `jax.nn.dot_product_attention` (None lets JAX choose;
        "cudnn" forces the fused GPU kernel, "xla" the portable one).
      remat_policy: rematerialisation of each block in the backward pass: "none", or the
        name of a `jax.checkpoint_policies` policy ("nothing_saveable" saves the most
        activation memory, "dots_saveable" keeps the matmul outputs).
      scan_unroll: blocks per iteration of the loops over blocks; 0 unrolls them completely.
        1 (a real loop) keeps compile time independent of depth. Full unrolling compiles
        slower but trains faster on CPU: the loop's stacked residual buffers (zero-filled
        every step) and per-iteration slicing disappear (see BENCHMARKS.md).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    long_skip: bool = False
    skip_init: str = "torch_default"
    dtype: str = "float32"
    attention_impl: str | None = None
    remat_policy: str = "none"
    scan_unroll: int = 1

    family: ClassVar[str] = "dit"

    @property
    def num_encoder_blocks(self) -> int:
        """Blocks before the U-turn; the decoder has the rest (equal when depth is even)."""
        return self.depth // 2

    def validate_layout(self) -> None:
        if self.long_skip and self.depth % 2:
            self._invalid(f"long skips pair block i with block depth-1-i, so depth must be even, got {self.depth}")
        if self.depth < 2:
            self._invalid(f"depth must be >= 2, got {self.depth}")

    @classmethod
    def upgrade_dict(cls, d: dict[str, Any]) -> dict[str, Any]:
        if "remat" in d:  # files written before remat became a policy name
            d.setdefault("remat_policy", "nothing_saveable" if d.pop("remat") else "none")
        return d


_PRESET_RE = re.compile(r"^(Skip-)?DiT-(S|B|L|XL)/(2|4|8)$")


def preset_names() -> list[str]:
    return [f"{s}DiT-{size}/{p}" for s in ("", "Skip-") for size in _SIZES for p in (2, 4, 8)]


def preset(name: str, **overrides) -> ModelConfig:
    """`ModelConfig` of a named preset: "DiT-XL/2", "Skip-DiT-S/4", ...

    The DiT presets are the DiT paper's ImageNet-256 latent models (32x32x4 input,
    1000 classes, learned sigma); "Skip-" adds long skip connections.
    """
    m = _PRESET_RE.match(name)
    if not m:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}")
    depth, width, heads = _SIZES[m.group(2)]
    kw = dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=int(m.group(3)), long_skip=bool(m.group(1)))
    kw.update(overrides)
    return ModelConfig(**kw)
