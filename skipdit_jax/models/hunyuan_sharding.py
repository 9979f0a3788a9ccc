"""FSDP sharding rules for Hunyuan-DiT parameters (logical axes for `skipdit_jax.sharding`).

Every matrix of the model names one dimension "embed", which the default rules shard over the
'fsdp' mesh axis; the rest ("layers", "hidden", None) stay whole. In the blocks "embed" is the
model width D (1408 for DiT-g/2): the input of the projections that read the hidden state
(q/k/v/out of self-attention, q/out of cross-attention, shift, fc1) and the output of the ones
that write it (cross-attention k/v read a caption, fc2 reads the MLP width, skip_linear reads
[h; skip] of width 2D). Outside the blocks some matrices never touch D (the T5 caption
embedder and pooler, widths 2048 / 8192 / 1024 for v1.2); they shard their widest dimension
instead, so no matrix above `min_shard_size` elements stays whole. Biases, LayerNorm
parameters and the per-head q/k norms are small and replicated.

For DiT-g/2 every sharded dimension (1408, 2048, 5632, 8192, 1024) is divisible by 8, so on
up to 8 FSDP devices each device holds ~1/n of the 1.5 B parameters (`skipdit_jax.sharding`
keeps a dimension the mesh does not divide whole rather than failing).
"""

from __future__ import annotations

_BLOCKS = r"(encoder|middle|decoder)_blocks"

# (regex over the "/"-joined parameter path, one logical axis per dimension); first match wins.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    # ---- the blocks: a leading layer axis --------------------------------------------------
    (rf"{_BLOCKS}/attn2/(to_k|to_v)/kernel", ("layers", "hidden", "embed")),  # caption width -> D
    (rf"{_BLOCKS}/(fc2|skip_linear)/kernel", ("layers", "hidden", "embed")),  # MLP width / 2D -> D
    (rf"{_BLOCKS}/.*/kernel", ("layers", "embed", "hidden")),  # D -> D or MLP width
    (rf"{_BLOCKS}/.*/(bias|scale)", ("layers", "hidden")),
    # ---- embedders ---------------------------------------------------------------------------
    (r"patch_embed/kernel", (None, None, None, "embed")),
    (r"(timestep_embedder|extra_embedder)/linear_1/kernel", ("hidden", "embed")),  # 256 / pooled -> D / 4D
    (r"(timestep_embedder|extra_embedder)/linear_2/kernel", ("hidden", "embed")),  # D / 4D -> D
    (r"text_embedder/linear_1/kernel", ("hidden", "embed")),  # T5 width -> 4 x T5 width
    (r"text_embedder/linear_2/kernel", ("embed", "hidden")),  # 4 x T5 width -> CLIP width
    (r"text_embedding_padding", (None, "embed")),
    (r"pooler/(q_proj|k_proj|v_proj)/kernel", ("hidden", "embed")),
    (r"pooler/c_proj/kernel", ("embed", "hidden")),
    (r"pooler/positional_embedding", (None, "embed")),
    # ---- output ------------------------------------------------------------------------------
    (r"norm_out/kernel", ("embed", "hidden")),
    (r"proj_out/kernel", ("embed", None)),
    (r"bias", ("hidden",)),  # every other bias (all outside the blocks are 1-D)
]
