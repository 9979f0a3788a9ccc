"""Long skips and stacked blocks, shared by every model family.

`SkipFusion` is the fusion module of every Skip-DiT task: `Linear(LayerNorm(concat([deep,
skip])))`, the projection replacing the hidden state (no residual). Blocks are stored
*stacked* (a leading layer axis, created by `stacked_init`) and run by `scan_blocks`, a
`lax.scan` over any contiguous range of the stack, which is what the cached passes need.
`remat` wraps a block function with the rematerialisation policy a config names.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from skipdit_jax.errors import ConfigError
from skipdit_jax.models.layers import LN_EPS, torch_default_bias, xavier, zeros

# "none" = no rematerialisation; any other name is a `jax.checkpoint_policies` attribute.
REMAT_POLICIES = (
    "none",
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)


def check_remat_policy(name: str) -> None:
    if name != "none" and not callable(getattr(jax.checkpoint_policies, str(name), None)):
        raise ConfigError(f"unknown remat_policy {name!r}; use 'none' or a jax.checkpoint_policies name such as {REMAT_POLICIES[1:]}")


def remat(fn, policy: str):
    """`fn` rematerialised in the backward pass under the named `jax.checkpoint_policies`
    policy ("nothing_saveable" recomputes everything: the least memory); "none" returns fn."""
    if policy == "none":
        return fn
    check_remat_policy(policy)
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))


class SkipFusion(nn.Module):
    """Long-skip fusion: Linear_{2D->D}(LayerNorm_{2D}(concat([deep, skip]))), LN in float32."""

    hidden_size: int
    skip_init: str = "torch_default"  # or "xavier"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, deep, skip):
        h = jnp.concatenate([deep, skip], axis=-1)
        h = nn.LayerNorm(
            epsilon=LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False, name="norm"
        )(h.astype(jnp.float32)).astype(deep.dtype)
        fan_in = 2 * self.hidden_size
        if self.skip_init == "xavier":
            kernel_init, bias_init = xavier, zeros
        else:  # PyTorch's nn.Linear default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
            kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
            bias_init = torch_default_bias(fan_in)
        return nn.Dense(
            self.hidden_size, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init, name="linear"
        )(h)


def stacked_init(module: nn.Module, count: int, *example_args):
    """Initialiser of `count` independent copies of `module`, stacked on a leading axis."""

    def init(key):
        keys = jax.random.split(key, count)
        return jax.vmap(lambda k: module.init(k, *example_args)["params"])(keys)

    return init


def scan_blocks(body, h, stacked, lo: int, hi: int, extra_xs=None, unroll: int = 1):
    """`lax.scan` of `body(h, block_params, extra) -> (h, y)` over blocks lo..hi-1 of
    `stacked` (a pytree with a leading block axis).

    Over the whole stack the weights are the scan's xs. Over part of it (the cached passes)
    the loop indexes the full stack instead: slicing `stacked[lo:hi]` first would copy
    those weights on every call, which on CPU costs as much as several blocks' compute.
    Only sampling scans part of a stack, so the index path needs no efficient gradient.
    """
    count = jax.tree.leaves(stacked)[0].shape[0]
    unroll = True if unroll == 0 else unroll
    if lo == 0 and hi == count:
        return jax.lax.scan(lambda h, xs: body(h, *xs), h, (stacked, extra_xs), unroll=unroll)

    def step(h, xs):
        i, extra = xs
        return body(h, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked), extra)

    return jax.lax.scan(step, h, (jnp.arange(lo, hi), extra_xs), unroll=unroll)

