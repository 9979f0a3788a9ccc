"""FSDP sharding rules for Hunyuan-DiT parameters (logical axes for `skipdit_jax.sharding`)."""

from __future__ import annotations

# (regex over the "/"-joined parameter path, one logical axis per dimension); first match wins.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = []
