"""`skipdit encode-text --t5 SPEC --tokenizer DIR (--prompt TEXT ... | --prompts FILE) --out FILE`:
prompts -> T5 v1.1 embeddings in a cache file that text-to-video sampling and training read.

SPEC is a transformers T5 encoder folder, Latte-1's repo root or its `text_encoder/` folder,
one weight file, or hf://maxin-cn/Latte-1/text_encoder. DIR holds the tokenizer (Latte-1's
`tokenizer/`: spiece.model). FILE lists one prompt per line (blank lines skipped). The
negative prompt (default "", the unconditional row for guidance) is always encoded too.
OUT (.safetensors or .npz) is written atomically; an existing OUT is refused unless
--overwrite (which replaces it) or --append (which keeps its prompts and adds new ones).

`skipdit encode-text --family hunyuan --pipeline DIR (--prompt TEXT ... | --prompts FILE) --out FILE`:
Hunyuan-DiT v1.2's two encoders (DIR: a HunyuanDiT-v1.2-Diffusers folder, the official `t2i/`
folder or its parent, or hf://...) -> clip_emb (N, 77, 1024), clip_mask, t5_emb (N, 256, 2048),
t5_mask and the (stripped) prompts, read back by `encoders.hunyuan_text.load_hunyuan_embeddings`.
The negative prompt (default: the official Chinese one) is encoded too.
"""

from __future__ import annotations

import time

from absl import flags

from skipdit_jax import paths
from skipdit_jax.errors import UserError

USAGE = (
    "--t5 SPEC --tokenizer DIR (--prompt TEXT [--prompt ...] | --prompts FILE) --out FILE(.safetensors|.npz), "
    "or --family hunyuan --pipeline DIR (--prompt ... | --prompts FILE) --out FILE"
)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("family", "t5", ["t5", "hunyuan"], "t5: one T5 v1.1 encoder (text-to-video); hunyuan: "
                      "Hunyuan-DiT v1.2's CLIP BERT + mT5 (text-to-image)", flag_values=fv)
    flags.DEFINE_string("pipeline", None, "--family hunyuan: a HunyuanDiT-v1.2(-Diffusers) folder or hf://org/repo",
                        flag_values=fv)
    flags.DEFINE_string("t5", None, "T5 v1.1 encoder: folder, weight file or hf://org/repo[/subfolder]", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "folder with the T5 tokenizer (spiece.model or tokenizer.json)", flag_values=fv)
    flags.DEFINE_multi_string("prompt", [], "a prompt (repeatable)", flag_values=fv)
    flags.DEFINE_string("prompts", None, "a text file with one prompt per line", flag_values=fv)
    flags.DEFINE_string("negative_prompt", "", "the unconditional prompt stored beside them (--family hunyuan: "
                        "empty means the official Chinese negative prompt)", flag_values=fv)
    flags.DEFINE_string("out", None, "output file (.safetensors or .npz)", flag_values=fv)
    flags.DEFINE_integer("max_length", 120, "tokens per prompt (Latte: 120)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "prompts per encoder call", flag_values=fv)
    flags.DEFINE_enum(
        "dtype",
        "float32",
        ["float32", "bfloat16"],
        "dtype of the encoder's weights and matmuls (bfloat16: "
        "XXL in 9.5 GB instead of 19; the norms, residuals and softmax stay float32)",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "preprocess", "lower", ["lower", "none"], "lower-case and strip prompts (as Latte) or keep them", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "replace OUT if it exists", flag_values=fv)
    flags.DEFINE_bool("append", False, "keep OUT's prompts and add the new ones", flag_values=fv)


def _read_prompts(fv: flags.FlagValues) -> list[str]:
    if bool(fv.prompt) == bool(fv.prompts):
        raise UserError("give prompts with --prompt TEXT (repeatable) or --prompts FILE, not both or neither")
    if fv.prompt:
        return list(fv.prompt)
    path = paths.as_path(fv.prompts)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts")
    return prompts


def _previous_output(fv: flags.FlagValues, load):
    """Checks --out, --overwrite and --append; returns `load(out)` when appending to an
    existing file, else None (OUT absent, or --overwrite)."""
    if not fv.out.endswith((".safetensors", ".npz")):
        raise UserError(f"--out must end in .safetensors or .npz, got {fv.out}")
    if fv.overwrite and fv.append:
        raise UserError("--overwrite and --append exclude each other")
    out = paths.as_path(fv.out)
    if not out.exists():
        return None
    if not (fv.overwrite or fv.append):
        raise UserError(f"{out} already exists (pass --overwrite to replace it or --append to add prompts)")
    return load(out) if fv.append else None


def main(args: list[str], fv: flags.FlagValues) -> int:
    from skipdit_jax.encoders.t5 import load_t5
    from skipdit_jax.encoders.text import encode_prompts, load_text_embeddings, load_tokenizer, save_text_embeddings

    if args:
        raise UserError(f"unexpected arguments {' '.join(args)}; usage: skipdit encode-text {USAGE}")
    if fv.family == "hunyuan":
        return _main_hunyuan(fv)
    for name in ("t5", "tokenizer", "out"):
        if not getattr(fv, name):
            raise UserError(f"--{name} is required; usage: skipdit encode-text {USAGE}")
    if fv.max_length < 1 or fv.batch_size < 1:
        raise UserError("--max_length and --batch_size must be positive")
    requested = _read_prompts(fv)
    old = _previous_output(fv, load_text_embeddings)
    out = paths.as_path(fv.out)
    if old is not None and old.text_emb.shape[1] != fv.max_length:
        raise UserError(f"{out} holds {old.text_emb.shape[1]}-token embeddings, not --max_length {fv.max_length}")
    prompts = list(dict.fromkeys(requested + [fv.negative_prompt]))
    if old is not None:
        prompts = [p for p in prompts if p not in old]
    tokenizer = load_tokenizer(fv.tokenizer)  # cheap checks before the (large) encoder loads
    start = time.perf_counter()
    cfg, params = load_t5(fv.t5, dtype=fv.dtype, param_dtype=fv.dtype)
    loaded = time.perf_counter() - start
    if prompts:
        start = time.perf_counter()
        enc = encode_prompts(prompts, tokenizer, cfg, params, fv.max_length, batch_size=fv.batch_size, preprocess=fv.preprocess)
        took = time.perf_counter() - start
        emb, mask = enc["text_emb"], enc["text_mask"]
    else:
        emb = mask = None
        took = 0.0
    if old is not None:
        import numpy as np

        all_prompts = old.prompts + prompts
        emb = old.text_emb if emb is None else np.concatenate([old.text_emb, emb])
        mask = old.text_mask if mask is None else np.concatenate([old.text_mask, mask])
    else:
        all_prompts = prompts
    info = {"t5": fv.t5, "max_length": fv.max_length, "d_model": cfg.d_model, "dtype": fv.dtype, "preprocess": fv.preprocess}
    save_text_embeddings(out, all_prompts, emb, mask, metadata=info)
    print(
        f"encoded {len(prompts)} prompt(s) (negative prompt {fv.negative_prompt!r} included) with T5 "
        f"d_model {cfg.d_model} x {cfg.num_layers} layers in {took:.1f} s (loading {loaded:.1f} s); "
        f"{len(all_prompts)} in {out}"
    )
    return 0


def _main_hunyuan(fv: flags.FlagValues) -> int:
    from skipdit_jax.encoders.hunyuan_text import (
        DEFAULT_NEGATIVE_PROMPT,
        encode_hunyuan_prompts,
        load_hunyuan_embeddings,
        load_hunyuan_text_encoders,
        save_hunyuan_embeddings,
    )

    usage = "--family hunyuan --pipeline DIR (--prompt TEXT ... | --prompts FILE) --out FILE(.safetensors|.npz)"
    for name in ("pipeline", "out"):
        if not getattr(fv, name):
            raise UserError(f"--{name} is required; usage: skipdit encode-text {usage}")
    if fv.t5 or fv.tokenizer:
        raise UserError("--family hunyuan reads both encoders and tokenizers from --pipeline: drop --t5 / --tokenizer")
    if fv.batch_size < 1:
        raise UserError("--batch_size must be positive")
    negative = fv.negative_prompt or DEFAULT_NEGATIVE_PROMPT
    # Stored as the encoder saw them: prompts stripped (as the official sampler), the negative verbatim.
    prompts = list(dict.fromkeys([p.strip() for p in _read_prompts(fv)] + [negative]))
    old = _previous_output(fv, load_hunyuan_embeddings)
    out = paths.as_path(fv.out)
    if old is not None:
        stored = set(old.prompts)
        prompts = [p for p in prompts if p not in stored]
    start = time.perf_counter()
    encoders = load_hunyuan_text_encoders(fv.pipeline, dtype=fv.dtype)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    arrays = encode_hunyuan_prompts(encoders, prompts, strip=False, batch_size=fv.batch_size) if prompts else None
    took = time.perf_counter() - start
    all_prompts = prompts
    if old is not None:
        import numpy as np

        all_prompts = old.prompts + prompts
        arrays = old.arrays if arrays is None else {k: np.concatenate([old.arrays[k], arrays[k]]) for k in old.arrays}
    info = {"family": "hunyuan", "pipeline": fv.pipeline, "dtype": fv.dtype}
    save_hunyuan_embeddings(out, all_prompts, arrays, metadata=info)
    print(f"encoded {len(prompts)} prompt(s) (negative prompt included) with Hunyuan-DiT's CLIP and mT5 in {took:.1f} s "
          f"(loading {loaded:.1f} s); {len(all_prompts)} in {out}")
    return 0
