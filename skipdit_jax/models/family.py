"""The model-family interface: what the sampler, the cache strategies, the train step and
the trainer may ask of a model, so that none of them imports a particular model.

A family (DiT; later Latte, Latte-T2V, Hunyuan-DiT) is a `ModelFamily` subclass. An
instance binds one model config (`family_of(config)` in `skipdit_jax.models.families`
builds it), is hashable, and answers for that model:

  * shapes: `sample_shape` (one sample, channels last), `eps_channels`, `learn_sigma`;
  * the condition: a pytree whose leaves have the batch as leading axis (class ids for
    DiT; nothing for an unconditional model; text embeddings + mask for text models).
    `check_condition` validates user input, `null_condition` builds the unconditional
    half of classifier-free guidance, `drop_condition` does training's condition dropout,
    `condition_from_batch` / `batch_spec` say what a training batch holds;
  * passes: `apply` (the plain forward), `forward_full` / `forward_shallow` (the two
    passes of the deep-feature cache: `cache_units` encoder-side units, of which a cached
    step runs the first k and the last k), `deep_feature_shape`;
  * the pieces the other cache strategies (FORA, PAB, Delta-DiT, TeaCache, PAB-video)
    need, for models without long skips, all in *units* (a DiT block; a Latte
    (spatial, temporal) pair) and with the hidden state in the family's own layout
    between units (`hidden_shape`): `embed` / `head` (tokens and conditioning vector c in,
    output out), `unit_stacks` (the stacked unit parameters, every unit once, in order),
    `run_units` (a contiguous range of units), `unit_with_branches` (one unit, also
    returning its attention/MLP outputs before their adaLN gates, a pytree shaped by
    `branch_shapes`), `unit_from_branches` (one unit rebuilt from such outputs under the
    current gates, no attention or MLP run), `unit_broadcast` (one unit where each
    attention kind (`attention_kinds`: "spatial", "temporal") and MLP is either computed
    or taken from stored gated outputs), and `probe` / `probe_shape` (TeaCache's signal:
    the first block's modulated input). Families without them raise `ConfigError`;
  * parameters: `init_params`, `count_params`; conversion: `from_torch`, `to_torch`.

Caching stays out of the model's call signature: a cache strategy composes these passes.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from skipdit_jax.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class ModelFamily(abc.ABC):
    """One model of a family. Subclasses set `name` and `config_cls` and implement the
    abstract methods; `config` is the frozen model config."""

    config: Any

    name: ClassVar[str] = ""
    config_cls: ClassVar[type] = object
    # What the condition is: "class" (class ids, a null id for guidance), "none", "text".
    condition_kind: ClassVar[str] = "class"

    # ---- shapes -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, channels last: (H, W, C) for images, (F, H, W, C) for video."""

    @property
    def eps_channels(self) -> int:
        return self.config.in_channels

    @property
    def learn_sigma(self) -> bool:
        return self.config.learn_sigma

    @property
    def compute_dtype(self):
        return self.config.compute_dtype

    # ---- the condition ------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def is_conditional(self) -> bool:
        """Whether the model takes a condition that guidance can drop."""

    @abc.abstractmethod
    def check_condition(self, condition, batch: int) -> None:
        """Raise `UserError` (one clear line) unless `condition` fits a batch of `batch`."""

    @abc.abstractmethod
    def null_condition(self, condition):
        """The unconditional counterpart of `condition` (same structure and batch)."""

    def drop_condition(self, condition, drop: jax.Array):
        """`condition` with the rows where `drop` (bool, (B,)) is set made unconditional."""
        null = self.null_condition(condition)
        return jax.tree.map(lambda c, n: jax.numpy.where(drop.reshape(drop.shape + (1,) * (c.ndim - 1)), n, c), condition, null)

    @abc.abstractmethod
    def condition_from_batch(self, batch: dict):
        """The condition pytree held by a training batch (None for unconditional models)."""

    @abc.abstractmethod
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of a training batch: "image" (the clean sample) + the condition."""

    @abc.abstractmethod
    def example_condition(self, num: int):
        """A condition for `num` preview samples (e.g. every class in turn), as numpy."""

    # ---- passes -------------------------------------------------------------------------
    @abc.abstractmethod
    def apply(self, params, x, t, condition) -> jax.Array:
        """The plain forward: (B, *sample_shape) -> (B, *sample_shape[:-1], out channels), f32."""

    @property
    @abc.abstractmethod
    def has_long_skips(self) -> bool:
        """Whether decoder-side units fuse the outputs of encoder-side units."""

    @property
    @abc.abstractmethod
    def cache_units(self) -> int:
        """Encoder-side units (blocks, or block pairs): a cached step may keep 1..this-1."""

    @property
    @abc.abstractmethod
    def depth_units(self) -> int:
        """All units of a full pass, in the unit a cache's block-count plan counts."""

    @abc.abstractmethod
    def forward_full(self, params, x, t, condition, shallow_units: int):
        """(output, deep feature): the deep feature is the hidden state entering the last
        `shallow_units` decoder-side units, which a later shallow pass starts from."""

    @abc.abstractmethod
    def forward_shallow(self, params, x, t, condition, deep_feature, shallow_units: int):
        """The output from the first and last `shallow_units` units and a cached deep feature."""

    @abc.abstractmethod
    def deep_feature_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the deep feature for a model batch of `batch`."""

    @property
    def param_axes(self) -> list[tuple[str, tuple[str | None, ...]]]:
        """Sharding rules as data: (regex over the "/"-joined parameter path, one logical
        axis name per dimension), first match wins; see `skipdit_jax.sharding`. A family
        without rules has every parameter replicated."""
        return []

    # ---- parameters and conversion ------------------------------------------------------
    @abc.abstractmethod
    def init_params(self, rng: jax.Array | int = 0):
        """Freshly initialised parameters (a plain pytree of float32 arrays)."""

    def abstract_params(self):
        return jax.eval_shape(lambda: self.init_params(0))

    def count_params(self, params=None) -> int:
        params = self.abstract_params() if params is None else params
        return int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))

    @classmethod
    @abc.abstractmethod
    def from_torch(cls, state_dict: dict, **kwargs) -> tuple[Any, Any]:
        """(config, params) of an official PyTorch state dict."""

    @abc.abstractmethod
    def to_torch(self, params) -> dict[str, np.ndarray]:
        """The official PyTorch state dict of `params`."""

    @classmethod
    @abc.abstractmethod
    def recognises(cls, state_dict: dict) -> bool:
        """Whether a PyTorch state dict looks like this family's."""

    def describe(self) -> str:
        """One line for logs: family, size, parameter count."""
        return f"{self.name} ({self.count_params():,} parameters)"

    # ---- pieces for the other cache strategies (models without long skips) --------------
    # Units are what `depth_units` counts; the hidden state between units has the shape
    # `hidden_shape(batch)`; `index` is a unit's global position (0 = the first unit).
    attention_kinds: ClassVar[tuple[str, ...]] = ()
    # True when the hidden state between units also carries the long-skip features, so
    # run_units / unit_* honour the skip fusion and the unit-based cache baselines apply.
    units_carry_skips: ClassVar[bool] = False

    def _no_pieces(self, what: str):
        raise ConfigError(f"the {self.name} family does not provide {what}, which this cache strategy needs")

    def embed(self, params, x, t, condition):
        """(hidden state entering unit 0, conditioning vector c (B, D))."""
        self._no_pieces("embed")

    def head(self, params, h, c):
        """The output (B, *sample_shape[:-1], out channels), float32, from the last unit's state."""
        self._no_pieces("head")

    def hidden_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the hidden state between units for a model batch of `batch`."""
        self._no_pieces("hidden_shape")

    def unit_stacks(self, params) -> tuple:
        """The stacked unit parameters (leading unit axis), every unit once, in order."""
        self._no_pieces("unit_stacks")

    def run_units(self, params, h, c, lo: int, hi: int):
        """Units lo..hi-1 (global indices)."""
        self._no_pieces("run_units")

    def branch_shapes(self, batch: int):
        """Pytree of shapes of one unit's branch record (`unit_with_branches`)."""
        self._no_pieces("branch_shapes")

    def unit_with_branches(self, unit_params, h, c, index):
        """(output, branches): one unit, with its attention and MLP outputs before the gates."""
        self._no_pieces("unit_with_branches")

    def unit_from_branches(self, unit_params, h, c, index, branches):
        """One unit's output rebuilt from stored pre-gate branches under the gates of c:
        h += gate_msa(c) * attn; h += gate_mlp(c) * mlp, per block of the unit."""
        self._no_pieces("unit_from_branches")

    def unit_broadcast(self, unit_params, h, c, index, stored, fresh):
        """(output, stored'): one unit where, per attention kind k, `fresh[k] = (attn, mlp)`
        (scalar bools) say whether the block's attention / MLP is computed (its gated output
        goes to stored') or its gated output is taken from `stored[k]` ((2, ...) arrays)."""
        self._no_pieces("unit_broadcast")

    def probe(self, params, h, c):
        """TeaCache's signal: the first block's modulated input LN(h)(1 + scale) + shift, f32."""
        self._no_pieces("probe")

    def probe_shape(self, batch: int) -> tuple[int, ...]:
        self._no_pieces("probe_shape")


@dataclasses.dataclass(frozen=True)
class ClassConditionalFamily(ModelFamily):
    """What the class-conditional families (DiT, Latte) share: the condition is class ids
    (B,) int32 with `config.num_classes` the null label used by guidance, or None for an
    unconditional model (num_classes == 0); the model is the linen module `module_cls(config)`
    with `forward_full` / `forward_shallow` methods for the deep-feature cache."""

    module_cls: ClassVar[type] = object

    @property
    def module(self):
        return self.module_cls(self.config)

    # ---- the condition ------------------------------------------------------------------
    @property
    def is_conditional(self) -> bool:
        return self.config.num_classes > 0

    def check_condition(self, condition, batch: int) -> None:
        if not self.is_conditional:
            if condition is not None:
                raise UserError("this model is unconditional (num_classes == 0): pass labels=None")
            return
        if condition is None:
            raise UserError(f"this model is class-conditional: pass labels, class ids in 0..{self.config.num_classes - 1}")
        shape = tuple(np.shape(condition))
        dtype = np.dtype(condition.dtype) if hasattr(condition, "dtype") else np.asarray(condition).dtype
        if len(shape) != 1 or shape[0] != batch:
            raise UserError(f"labels must have shape ({batch},) to match the noise batch, got {shape}")
        if not np.issubdtype(dtype, np.integer):
            raise UserError(f"labels must be integer class ids, got dtype {dtype}")
        if isinstance(condition, jax.Array) and not condition.is_fully_addressable:
            return  # split over processes: its values cannot be read here without a collective
        labels = np.asarray(condition)
        n = self.config.num_classes
        if labels.size and (labels.min() < 0 or labels.max() > n):
            raise UserError(
                f"labels must be class ids in 0..{n - 1} (or {n}, the null label), got values in {labels.min()}..{labels.max()}"
            )

    def null_condition(self, condition):
        # Every leaf is class ids (a dict of them for Latte's joint training batches).
        return jax.tree.map(lambda c: jax.numpy.full_like(c, self.config.null_label), condition)

    def condition_from_batch(self, batch: dict):
        return batch["label"].astype(np.int32) if self.is_conditional else None

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            "image": jax.ShapeDtypeStruct((batch_size, *self.sample_shape), np.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32),
        }

    def example_condition(self, num: int):
        return np.arange(num, dtype=np.int32) % max(self.config.num_classes, 1) if self.is_conditional else None

    # ---- passes -------------------------------------------------------------------------
    def apply(self, params, x, t, condition):
        return self.module.apply({"params": params}, x, t, condition)

    @property
    def has_long_skips(self) -> bool:
        return self.config.long_skip

    def forward_full(self, params, x, t, condition, shallow_units: int):
        return self.module.apply({"params": params}, x, t, condition, shallow_units, method=self.module_cls.forward_full)

    def forward_shallow(self, params, x, t, condition, deep_feature, shallow_units: int):
        return self.module.apply(
            {"params": params}, x, t, condition, deep_feature, shallow_units, method=self.module_cls.forward_shallow
        )

