"""Hunyuan-DiT v1.2's two text encoders: prompts -> the condition arrays of the DiT.

  CLIP: a CLIP-trained Chinese BERT (transformers `BertModel`, 1024 wide, 24 layers) with a
        WordPiece `BertTokenizer`: 77 tokens x 1024.
  mT5:  mT5-XL's encoder (T5 v1.1 architecture, 2048 wide, 24 layers, 250112 tokens) with its
        SentencePiece tokenizer: 256 tokens x 2048.

What the official inference does (Skip-DiT text-to-image / Tencent HunyuanDiT:
hydit/inference.py `End2End`, hydit/diffusion/pipeline.py `encode_prompt`,
hydit/modules/text_encoder.py `MT5Embedder`), and what `encode_hunyuan_prompts` reproduces:
  - The prompt is `.strip()`ped (`End2End.predict`); the negative prompt is used verbatim. No
    lower-casing here: the BERT tokenizer lower-cases by itself (`do_lower_case`).
  - Both tokenizers: padding="max_length", truncation=True, special tokens added, attention
    mask returned. CLIP: max_length = the tokenizer's `model_max_length`, which is the DiT's
    `text_len` 77 ([CLS] ... [SEP] [PAD]...). mT5: `MT5Embedder(max_length=256)` (... </s>
    <pad>...; no start token). A cut prompt keeps its closing [SEP] / </s>.
  - Each encoder runs with that mask and its *last* hidden state is the embedding
    (`BertModel(...)[0]`; `T5EncoderModel(...)[0]`, i.e. after T5's final norm,
    `hidden_states[-1]` in `MT5Embedder`). Padded positions keep their (masked-key) outputs;
    the DiT masks them out with the mask.
  - The unconditional branch encodes the negative prompt (default `DEFAULT_NEGATIVE_PROMPT`,
    hydit/constants.py `NEGATIVE_PROMPT`, also used when the user passes "") the same way.
Where diffusers' `HunyuanDiTPipeline` differs, we follow the official inference: diffusers does
not strip the prompt and, without a negative prompt, uses "" instead of the Chinese one; it
hard-codes the same 77 / 256 lengths and the same tokenizer calls. Precision: the official
code runs the BERT in float32 and mT5 in float16; we default to float32 for both (`dtype`).

Encoded prompts can be kept in a file (`save_hunyuan_embeddings` / `load_hunyuan_embeddings`,
written by `skipdit encode-text --family hunyuan`), so sampling need not load the encoders.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from skipdit_jax import hub, paths
from skipdit_jax.encoders.text import read_prompt_arrays, write_prompt_arrays
from skipdit_jax.errors import HubUnavailableError, UserError
from skipdit_jax.models.hunyuan_family import TEXT_KEYS

# hydit/constants.py NEGATIVE_PROMPT (Skip-DiT text-to-image and Tencent HunyuanDiT): "wrong
# eyes, bad faces, disfigurement, bad art, deformation, extra limbs, blurry colours, blur,
# duplication, morbid, mutilated," -- the default unconditional caption of the official sampler.
DEFAULT_NEGATIVE_PROMPT = "错误的眼睛，糟糕的人脸，毁容，糟糕的艺术，变形，多余的肢体，模糊的颜色，模糊，重复，病态，残缺，"
CLIP_MAX_LENGTH = 77  # the DiT's text_len
T5_MAX_LENGTH = 256  # the DiT's text_len_t5

# Folder names of the two layouts: the official `t2i/` folder and a diffusers pipeline folder.
OFFICIAL_LAYOUT = {"clip": "clip_text_encoder", "mt5": "mt5", "clip_tokenizer": "tokenizer", "t5_tokenizer": "mt5"}
DIFFUSERS_LAYOUT = {"clip": "text_encoder", "mt5": "text_encoder_2", "clip_tokenizer": "tokenizer", "t5_tokenizer": "tokenizer_2"}
_T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


@dataclasses.dataclass(frozen=True, eq=False)
class HunyuanTextEncoders:
    """Both encoders (configs + parameter pytrees) and their tokenizers, ready to encode."""

    bert_config: Any  # encoders.bert.BertConfig
    bert_params: dict
    t5_config: Any  # encoders.t5.T5Config
    t5_params: dict
    clip_tokenizer: Any  # a transformers BertTokenizer
    t5_tokenizer: Any  # a transformers T5 tokenizer (mT5's SentencePiece model)


# ---- finding the files --------------------------------------------------------------------------
def _is_diffusers(root: epath.Path) -> bool:
    return (root / "model_index.json").exists() or (root / DIFFUSERS_LAYOUT["mt5"]).is_dir()


def find_text_encoder_folders(folder: paths.PathLike) -> dict[str, epath.Path]:
    """{"clip", "mt5", "clip_tokenizer", "t5_tokenizer"} -> their folders inside a
    HunyuanDiT-v1.2-Diffusers folder (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/),
    an official `t2i/` folder (clip_text_encoder/, mt5/, tokenizer/; mT5's tokenizer is inside
    mt5/) or the folder above `t2i/`. Nothing is checked beyond the layout."""
    root = paths.as_path(folder)
    if not root.is_dir():
        raise UserError(f"Hunyuan-DiT folder {root} does not exist")
    if _is_diffusers(root):
        layout = DIFFUSERS_LAYOUT
    else:
        if not (root / OFFICIAL_LAYOUT["clip"]).is_dir() and (root / "t2i").is_dir():
            root = root / "t2i"
        layout = OFFICIAL_LAYOUT
    return {key: root / name for key, name in layout.items()}


def _hub_folders(spec: str, revision, cache_dir) -> tuple[dict[str, str], str]:
    """For "hf://org/repo[/sub]": fetches the small files of either layout, picks the layout,
    and returns hf:// specs for the encoders (their weights are fetched by load_bert/load_t5)
    and the local snapshot folder for the tokenizers."""
    from huggingface_hub import snapshot_download

    repo, sub = hub.parse_hub_spec(spec, "hf://Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers")
    # Configs and tokenizer files of both layouts (the official one with or without t2i/), no weights.
    small = ["model_index.json", "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/*", "tokenizer_2/*"]
    for base in ("", "t2i/"):
        small += [f"{base}clip_text_encoder/config.json", f"{base}tokenizer/*", f"{base}mt5/*.json", f"{base}mt5/spiece.model"]
    prefix = f"{sub}/" if sub else ""
    try:
        root = paths.as_path(
            snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=[prefix + p for p in small])
        )
    except Exception as e:
        if hub.is_network_error(e):
            raise HubUnavailableError(
                f"could not reach the Hugging Face Hub to fetch {repo!r} and it is not in the local cache "
                f"({type(e).__name__}); give a local HunyuanDiT-v1.2 folder instead"
            ) from None
        raise
    local = find_text_encoder_folders(root / sub if sub else root)
    base = root / sub if sub else root
    rel = {k: os.path.relpath(os.fspath(v), os.fspath(base)).replace(os.sep, "/") for k, v in local.items()}
    specs = {k: f"hf://{repo}/{prefix}{rel[k]}" for k in ("clip", "mt5")}
    specs.update({k: os.fspath(local[k]) for k in ("clip_tokenizer", "t5_tokenizer")})
    return specs, os.fspath(base)


# ---- tokenizers ---------------------------------------------------------------------------------
def load_clip_tokenizer(folder: paths.PathLike):
    """Hunyuan's CLIP (BERT WordPiece) tokenizer from local files: vocab.txt (+ tokenizer_config.json
    and special_tokens_map.json when present). One UserError line if vocab.txt is missing."""
    from skipdit_jax.encoders.text import _as_local_dir

    path = paths.as_path(folder)
    if not (path / "vocab.txt").exists():
        raise UserError(f"no CLIP tokenizer vocabulary {path / 'vocab.txt'} (Hunyuan-DiT's tokenizer/ folder)")
    try:
        import transformers
    except ImportError:
        raise UserError(
            "the Hunyuan-DiT tokenizers need transformers and sentencepiece: pip install 'skipdit-jax[text]'"
        ) from None
    with _as_local_dir(path) as local:
        try:
            return transformers.BertTokenizer.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError, ImportError, TypeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot load the CLIP tokenizer in {path}: {why}") from None


def load_mt5_tokenizer(folder: paths.PathLike):
    """mT5's SentencePiece tokenizer from local files: spiece.model or tokenizer.json (+ its
    tokenizer_config.json / special_tokens_map.json). One UserError line if neither is there."""
    from skipdit_jax.encoders.text import load_tokenizer

    path = paths.as_path(folder)
    if not any((path / f).exists() for f in _T5_TOKENIZER_FILES):
        raise UserError(f"no mT5 tokenizer in {path}: it needs spiece.model or tokenizer.json")
    return load_tokenizer(path)


def tokenize_hunyuan(prompts: Sequence[str], tokenizer, max_length: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both (N, max_length) int32, as the official pipeline tokenizes: padded to
    max_length, truncated, special tokens added. One warning line per cut prompt, naming the
    encoder (`name`) and its limit."""
    enc = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_attention_mask=True,
        add_special_tokens=True,
    )
    full = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    for prompt, ids in zip(prompts, full, strict=True):
        if len(ids) > max_length:
            logging.warning(f"{name} takes at most {max_length} tokens: prompt {prompt!r} has {len(ids)}, the rest was cut")
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


# ---- loading ------------------------------------------------------------------------------------
def load_hunyuan_text_encoders(
    folder: paths.PathLike | None = None,
    *,
    clip: paths.PathLike | None = None,
    mt5: paths.PathLike | None = None,
    clip_tokenizer: paths.PathLike | None = None,
    t5_tokenizer: paths.PathLike | None = None,
    dtype: str = "float32",
    param_dtype: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> HunyuanTextEncoders:
    """Loads both encoders and tokenizers.

    `folder`: a HunyuanDiT-v1.2-Diffusers folder (text_encoder/, text_encoder_2/, tokenizer/,
    tokenizer_2/), the official HunyuanDiT-v1.2 `t2i/` folder (clip_text_encoder/, mt5/ with mT5's
    tokenizer inside, tokenizer/) or its parent, or "hf://org/repo[/subfolder]" of either.
    `clip`, `mt5`, `clip_tokenizer`, `t5_tokenizer` override single parts (all four when no
    folder is given). `dtype`: compute dtype; `param_dtype`: storage dtype (default = dtype).
    A missing part is one UserError line naming it.
    """
    from skipdit_jax.encoders.bert import load_bert
    from skipdit_jax.encoders.t5_io import load_t5

    given = {"clip": clip, "mt5": mt5, "clip_tokenizer": clip_tokenizer, "t5_tokenizer": t5_tokenizer}
    where: dict[str, Any] = {}
    if folder is not None:
        spec = str(folder) if isinstance(folder, epath.Path) else os.fspath(folder)
        if hub.is_hub_spec(spec):
            where, _ = _hub_folders(spec, revision, cache_dir)
        else:
            where = find_text_encoder_folders(spec)
    missing = [k for k, v in given.items() if v is None and k not in where]
    if missing:
        raise UserError(f"no Hunyuan-DiT folder given and no {', '.join(missing)} path: pass the folder or every part")
    where.update({k: v for k, v in given.items() if v is not None})
    for key in ("clip", "mt5"):
        spec = where[key]
        if not hub.is_hub_spec(str(spec)) and not paths.as_path(spec).is_dir():
            raise UserError(f"no {'CLIP text encoder' if key == 'clip' else 'mT5 encoder'} folder {paths.as_path(spec)}")
    pdt = param_dtype or dtype
    clip_tok = load_clip_tokenizer(where["clip_tokenizer"])
    t5_tok = load_mt5_tokenizer(where["t5_tokenizer"])
    bert_cfg, bert_params = load_bert(where["clip"], dtype=dtype, param_dtype=pdt, revision=revision, cache_dir=cache_dir)
    t5_cfg, t5_params = load_t5(where["mt5"], dtype=dtype, param_dtype=pdt, revision=revision, cache_dir=cache_dir)
    for name, tok, vocab in (("CLIP", clip_tok, bert_cfg.vocab_size), ("mT5", t5_tok, t5_cfg.vocab_size)):
        if len(tok) > vocab:
            raise UserError(
                f"the {name} tokenizer has {len(tok)} tokens but its encoder's vocabulary has {vocab}: mismatched files"
            )
    return HunyuanTextEncoders(bert_cfg, bert_params, t5_cfg, t5_params, clip_tok, t5_tok)


# ---- encoding -----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _bert_apply(cfg, params, ids, mask):
    from skipdit_jax.encoders import bert

    return bert.encode(cfg, params, ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def _t5_apply(cfg, params, ids, mask):
    from skipdit_jax.encoders import t5

    return t5.encode(cfg, params, ids, mask)


def _run_batched(fn, cfg, params, ids: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over fixed-size batches (the last padded by repeating its last row). The batch is
    the power of two >= n, capped at batch_size: few compilations, little padding."""
    n = len(ids)
    bs = max(1, min(batch_size, 1 << (n - 1).bit_length()))
    pad = (-n) % bs
    if pad:
        ids, mask = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)]), np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
    out = [np.asarray(fn(cfg, params, ids[i : i + bs], mask[i : i + bs])) for i in range(0, n + pad, bs)]
    return np.concatenate(out)[:n].astype(np.float32)


def _encode(encoders: HunyuanTextEncoders, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
    clip_ids, clip_mask = tokenize_hunyuan(texts, encoders.clip_tokenizer, CLIP_MAX_LENGTH, "the CLIP text encoder")
    t5_ids, t5_mask = tokenize_hunyuan(texts, encoders.t5_tokenizer, T5_MAX_LENGTH, "the mT5 text encoder")
    return {
        "clip_emb": _run_batched(_bert_apply, encoders.bert_config, encoders.bert_params, clip_ids, clip_mask, batch_size),
        "clip_mask": clip_mask,
        "t5_emb": _run_batched(_t5_apply, encoders.t5_config, encoders.t5_params, t5_ids, t5_mask, batch_size),
        "t5_mask": t5_mask,
    }


def _as_prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompts to encode")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise UserError(f"prompts must be strings, got {type(bad[0]).__name__}")
    return prompts


def encode_hunyuan_prompts(
    encoders: HunyuanTextEncoders, prompts: Sequence[str] | str, *, strip: bool = True, batch_size: int = 8
) -> dict[str, np.ndarray]:
    """{"clip_emb" (B, 77, 1024) float32, "clip_mask" (B, 77) int32, "t5_emb" (B, 256, 2048)
    float32, "t5_mask" (B, 256) int32} (widths those of the loaded encoders), tokenized and
    encoded as the official inference does (module docstring). `strip=False` keeps the
    prompts verbatim (the official code does so for the negative prompt). The encoders run in
    fixed batches of `batch_size` (the last one padded): one compilation per batch size."""
    prompts = _as_prompt_list(prompts)
    return _encode(encoders, [p.strip() for p in prompts] if strip else prompts, batch_size)


def hunyuan_condition(
    encoders: HunyuanTextEncoders,
    prompts: Sequence[str] | str,
    negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
    *,
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """The DiT's condition dict (models.hunyuan_family.CONDITION_KEYS): the prompts' four arrays
    and, under null_*, the negative prompt's (one identical row per prompt). As the official
    sampler, None or "" means `DEFAULT_NEGATIVE_PROMPT`; prompts are stripped, the negative
    prompt is not. Prompts and negative prompt are encoded together (one pass)."""
    prompts = _as_prompt_list(prompts)
    if negative_prompt is None or negative_prompt == "":
        negative_prompt = DEFAULT_NEGATIVE_PROMPT
    if not isinstance(negative_prompt, str):
        raise UserError(f"the negative prompt must be a string, got {type(negative_prompt).__name__}")
    n = len(prompts)
    out = _encode(encoders, [p.strip() for p in prompts] + [negative_prompt], batch_size)
    cond = {k: v[:n] for k, v in out.items()}
    return {**cond, **{f"null_{k}": np.repeat(v[n:], n, axis=0) for k, v in out.items()}}


# ---- an embedding file ----------------------------------------------------------------------------
@dataclasses.dataclass
class HunyuanEmbeddings:
    """Encoded prompts read from a file: `prompts[i]` <-> row i of each of the four arrays."""

    prompts: list[str]
    arrays: dict[str, np.ndarray]  # clip_emb, clip_mask, t5_emb, t5_mask
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def lookup(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The four arrays for these prompts (exact strings as stored: prompts stripped)."""
        index = {p: i for i, p in reversed(list(enumerate(self.prompts)))}
        missing = [p for p in prompts if p not in index]
        if missing:
            raise UserError(f"prompt {missing[0]!r} is not in the embedding file ({len(missing)} missing): encode it first")
        rows = [index[p] for p in prompts]
        return {k: v[rows] for k, v in self.arrays.items()}

    def condition(self, prompts: Sequence[str], negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT) -> dict[str, np.ndarray]:
        """As `hunyuan_condition`, from the file (prompts are stripped before the lookup)."""
        prompts = [p.strip() for p in _as_prompt_list(prompts)]
        negative = negative_prompt or DEFAULT_NEGATIVE_PROMPT
        cond = self.lookup(prompts)
        null = self.lookup([negative])
        return {**cond, **{f"null_{k}": np.repeat(v, len(prompts), axis=0) for k, v in null.items()}}


def save_hunyuan_embeddings(
    path: paths.PathLike, prompts: Sequence[str], arrays: dict[str, np.ndarray], metadata: dict | None = None
) -> None:
    """Writes prompts + the four arrays atomically (.safetensors or .npz by suffix, no pickles)."""
    data = {k: np.asarray(arrays[k], np.float32 if k.endswith("emb") else np.int32) for k in TEXT_KEYS}
    write_prompt_arrays(path, prompts, data, metadata, what="Hunyuan-DiT embedding file")


def load_hunyuan_embeddings(path: paths.PathLike) -> HunyuanEmbeddings:
    """Reads a file written by `save_hunyuan_embeddings` (one UserError line if it is not one)."""
    prompts, arrays, info = read_prompt_arrays(
        path, TEXT_KEYS, what="Hunyuan-DiT embedding file", make_it="skipdit encode-text --family hunyuan"
    )
    return HunyuanEmbeddings(list(prompts), arrays, info)
