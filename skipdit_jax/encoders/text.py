"""Prompts -> T5 embeddings for text-to-video models, and a file that caches them.

What Latte's `LattePipeline.encode_prompt` (the official Skip-DiT t2v sampler) does, and what
we do:
  - Prompts are lower-cased and stripped (its `_text_preprocessing` fallback; with bs4 and ftfy
    installed it would also run `_clean_caption`'s regex clean-up, which we do not reproduce:
    pass already clean prompts, or `preprocess="none"` to keep them verbatim).
  - The T5 tokenizer pads to max_length=120 with truncation (a warning names the prompt and
    what was cut); the encoder sees the attention mask (padded keys masked out).
  - `mask_feature=True` with one prompt per call (as `sample_t2v.py` runs it) cuts the prompt
    embedding to its `keep` = mask.sum() real tokens (EOS included) and the negative-prompt
    ("") embedding to the same first `keep` rows, and the transformer attends to all of them
    (no encoder mask). With fixed-length (B, 120) arrays the same thing is: text_emb with
    text_mask, and null_emb = the "" embedding with null_mask = text_mask (the "" encoding's
    rows past its EOS are T5 outputs at padded positions, which that slice includes).
    `text_condition(..., null_mask="official")` builds exactly that; "own" uses the "" mask.
The cache file (`save_text_embeddings` / `load_text_embeddings`) is a .safetensors or .npz
holding text_emb (N, L, D) float32, text_mask (N, L) int32 and the prompts (as given, before
preprocessing) as JSON, so a prompt is looked up by its exact string.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from skipdit_jax import paths
from skipdit_jax.errors import UserError

MAX_LENGTH = 120  # Latte / PixArt-alpha's T5 token count
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def load_tokenizer(folder: paths.PathLike):
    """The T5 tokenizer saved in `folder` (or its `tokenizer/` subfolder, as in Latte-1's
    repo), from local files only: tokenizer.json or spiece.model (+ tokenizer_config.json and
    special_tokens_map.json when present). UserError if neither file is there."""
    path = paths.as_path(folder)
    if not path.is_dir():
        raise UserError(f"tokenizer folder {path} does not exist")
    if not any((path / f).exists() for f in _TOKENIZER_FILES) and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise UserError(f"no T5 tokenizer in {path}: it needs tokenizer.json or spiece.model (Latte-1's tokenizer/ folder)")
    try:
        import transformers
    except ImportError:
        raise UserError("the T5 tokenizer needs transformers and sentencepiece: pip install 'skipdit-jax[text]'") from None
    # T5TokenizerFast in transformers 4 (T5Tokenizer is the slow sentencepiece one there); in
    # transformers 5 both names are the tokenizers-backed class.
    cls = getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer
    with _as_local_dir(path) as local:
        try:
            return cls.from_pretrained(local, local_files_only=True)
        except (OSError, ValueError, ImportError, TypeError) as e:
            raise UserError(
                f"cannot load the T5 tokenizer in {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None


class _as_local_dir:
    """A local folder with the tokenizer files of `path` (itself when local)."""

    def __init__(self, path):
        self.path, self.tmp = path, None

    def __enter__(self) -> str:
        import os
        import tempfile

        if paths.is_local(self.path):
            return os.fspath(self.path)
        self.tmp = tempfile.TemporaryDirectory(prefix="skipdit-tokenizer-")
        for f in self.path.iterdir():
            if f.is_file():
                paths.copy_file(f, os.path.join(self.tmp.name, f.name))
        return self.tmp.name

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.cleanup()


def preprocess_prompt(prompt: str, mode: str = "lower") -> str:
    if mode == "none":
        return prompt
    if mode == "lower":
        return prompt.lower().strip()
    raise UserError(f"unknown prompt preprocessing {mode!r}: use 'lower' (as Latte's pipeline) or 'none'")


def tokenize(
    prompts: Sequence[str], tokenizer, max_length: int = MAX_LENGTH, preprocess: str = "lower"
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both (N, max_length) int32: EOS-terminated, padded, truncated to
    max_length with a warning naming each prompt that lost tokens and how many."""
    if max_length < 1:
        raise UserError(f"max_length must be positive, got {max_length}")
    texts = [preprocess_prompt(p, preprocess) for p in prompts]
    enc = tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True, return_attention_mask=True, add_special_tokens=True
    )
    full = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for prompt, ids in zip(prompts, full, strict=True):
        if len(ids) > max_length:
            cut = len(ids) - max_length
            removed = tokenizer.decode(ids[max_length - 1 : -1])
            logging.warning(
                f"prompt {prompt!r} is {len(ids)} tokens, longer than {max_length}: its last {cut} tokens were cut ({removed!r})"
            )
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def encode_prompts(
    prompts: Sequence[str],
    tokenizer,
    t5_config,
    params,
    max_length: int = MAX_LENGTH,
    *,
    batch_size: int = 8,
    preprocess: str = "lower",
) -> dict[str, np.ndarray]:
    """{"text_emb": (N, max_length, d_model) float32, "text_mask": (N, max_length) int32}.
    Runs the encoder in fixed batches of `batch_size` (the last one padded), one compilation."""
    import jax
    import jax.numpy as jnp

    from skipdit_jax.encoders.t5 import T5Encoder

    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise UserError("no prompts to encode")
    if len(tokenizer) > t5_config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the T5 encoder's vocabulary has {t5_config.vocab_size}: "
            "mismatched tokenizer"
        )
    ids, mask = tokenize(prompts, tokenizer, max_length, preprocess)
    n, bs = len(prompts), max(1, min(batch_size, len(prompts)))
    apply = jax.jit(lambda p, i, m: T5Encoder(t5_config).apply({"params": p}, i, m))
    pad = (-n) % bs
    ids_p = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)]) if pad else ids
    mask_p = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)]) if pad else mask
    out = [
        np.asarray(apply(params, jnp.asarray(ids_p[i : i + bs]), jnp.asarray(mask_p[i : i + bs]))) for i in range(0, n + pad, bs)
    ]
    return {"text_emb": np.concatenate(out)[:n].astype(np.float32), "text_mask": mask}


# ---- the embedding cache file ------------------------------------------------------------
@dataclasses.dataclass
class TextEmbeddings:
    """Cached prompt embeddings: `prompts[i]` <-> `text_emb[i]` (L, D), `text_mask[i]` (L,)."""

    prompts: list[str]
    text_emb: np.ndarray
    text_mask: np.ndarray
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._index

    @property
    def _index(self) -> dict[str, int]:
        return {p: i for i, p in reversed(list(enumerate(self.prompts)))}

    def lookup(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """{"text_emb": (B, L, D), "text_mask": (B, L)} for these prompts (exact strings)."""
        index = self._index
        missing = [p for p in prompts if p not in index]
        if missing:
            raise UserError(
                f"prompt {missing[0]!r} is not in the embedding file ({len(missing)} missing): run skipdit encode-text for it"
            )
        rows = [index[p] for p in prompts]
        return {"text_emb": self.text_emb[rows], "text_mask": self.text_mask[rows]}


def write_prompt_arrays(
    path: paths.PathLike,
    prompts: Sequence[str],
    arrays: dict[str, np.ndarray],
    metadata: dict | None = None,
    what: str = "text embedding file",
) -> None:
    """The prompt-keyed array file every text encoder here writes: `arrays` (row i <-> prompts[i])
    plus the prompts and `metadata` as JSON, atomically; .safetensors or .npz by suffix (no
    pickled objects either way)."""
    path = paths.as_path(path)
    if any(len(v) != len(prompts) for v in arrays.values()):
        raise UserError(f"{len(prompts)} prompts but arrays of {', '.join(str(len(v)) for v in arrays.values())} rows")
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {"prompts": json.dumps([str(p) for p in prompts], ensure_ascii=False), "info": json.dumps(metadata or {})}
    if path.name.endswith(".safetensors"):
        from safetensors.numpy import save

        data = save(arrays, metadata=meta)
    elif path.name.endswith(".npz"):
        buf = io.BytesIO()
        as_bytes = lambda s: np.frombuffer(s.encode("utf-8"), np.uint8)  # noqa: E731
        np.savez(buf, **arrays, prompts=as_bytes(meta["prompts"]), info=as_bytes(meta["info"]))
        data = buf.getvalue()
    else:
        raise UserError(f"{what} {path} must end in .safetensors or .npz")
    paths.atomic_write_bytes(path, data)


def read_prompt_arrays(
    path: paths.PathLike, keys: Sequence[str], what: str = "text embedding file", make_it: str = "skipdit encode-text"
) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """(prompts, {key: array}, metadata) of a `write_prompt_arrays` file; anything else (a
    missing key, rows that do not match the prompts) is one UserError line."""
    path = paths.as_path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist (make it with {make_it})")
    try:
        raw = path.read_bytes()
        if path.name.endswith(".safetensors"):
            from safetensors.numpy import load

            arrays = load(raw)
            size = int.from_bytes(raw[:8], "little")
            meta = json.loads(raw[8 : 8 + size]).get("__metadata__") or {}
        else:
            with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = {k: arrays.pop(k).tobytes().decode("utf-8") for k in ("prompts", "info")}
        prompts = json.loads(meta["prompts"])
        info = json.loads(meta.get("info", "{}"))
        arrays = {k: arrays[k] for k in keys}
    except Exception as e:  # OSError, ValueError, KeyError, ... and safetensors' own error type
        why = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{path} is not a {what}: {type(e).__name__}: {why}") from None
    if not isinstance(prompts, list) or any(len(v) != len(prompts) for v in arrays.values()):
        raise UserError(f"{path}: {len(prompts)} prompts but arrays of {', '.join(str(len(v)) for v in arrays.values())} rows")
    return prompts, arrays, info


def save_text_embeddings(path: paths.PathLike, prompts: Sequence[str], emb, mask, metadata: dict | None = None) -> None:
    """Writes the cache file atomically; .safetensors or .npz by suffix. Repeated prompts
    are stored once (the first occurrence)."""
    emb, mask = np.asarray(emb, np.float32), np.asarray(mask, np.int32)
    if emb.ndim != 3 or mask.shape != emb.shape[:2] or len(prompts) != emb.shape[0]:
        raise UserError(f"embeddings {emb.shape}, mask {mask.shape} and {len(prompts)} prompts do not match")
    first = {}
    for i, p in enumerate(prompts):
        first.setdefault(str(p), i)
    keep = sorted(first.values())
    write_prompt_arrays(path, [str(prompts[i]) for i in keep], {"text_emb": emb[keep], "text_mask": mask[keep]}, metadata)


def load_text_embeddings(path: paths.PathLike) -> TextEmbeddings:
    """Reads a file written by `save_text_embeddings` (one UserError line if it is not one)."""
    prompts, arrays, info = read_prompt_arrays(path, ("text_emb", "text_mask"))
    emb, mask = arrays["text_emb"], arrays["text_mask"]
    if emb.ndim != 3 or mask.shape != emb.shape[:2]:
        raise UserError(f"{path}: text_emb {emb.shape} and text_mask {mask.shape} do not match")
    return TextEmbeddings(list(prompts), emb.astype(np.float32), mask.astype(np.int32), info)


def text_condition(
    cache: TextEmbeddings, prompts: Sequence[str], negative_prompt: str = "", null_mask: str = "official"
) -> dict[str, np.ndarray]:
    """The text-to-video condition {"text_emb", "text_mask", "null_emb", "null_mask"} for
    `prompts`, the unconditional row being `negative_prompt`'s embedding. null_mask="official"
    reproduces LattePipeline's mask_feature slicing (null_mask = each prompt's text_mask, see
    the module docstring); "own" uses the negative prompt's own mask."""
    if null_mask not in ("official", "own"):
        raise UserError(f"null_mask must be 'official' or 'own', got {null_mask!r}")
    text = cache.lookup(list(prompts))
    null = cache.lookup([negative_prompt] * len(prompts))
    return {
        **text,
        "null_emb": null["text_emb"],
        "null_mask": text["text_mask"].copy() if null_mask == "official" else null["text_mask"],
    }
