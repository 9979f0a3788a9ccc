"""Text-video training data: clips with the condition of a text-to-video model.

Records are the clip plus the condition keys of the text families:

    {"image": float32 (F, H, W, C),
     "text_emb": float32 (L, D), "text_mask": int32 (L,),      # the clip's caption, encoded
     "null_emb": float32 (L, D), "null_mask": int32 (L,)}      # the empty prompt, encoded

and, for a model that trains its own small text encoder (`latte_t2v_joint`), token ids
instead of embeddings: "ids", "mask", "null_ids", "null_mask" (int32 (L,)). The trainer's
pipeline keeps only the fields the model's `batch_spec` names.

Sources:
  - `TextMovingDigitsSource`: the moving-digits clips (`skipdit_jax.data.moving_digits`)
    with their captions ("a 7 moving up and right"). Tokens come from `WORD_VOCAB`, a
    word-level vocabulary of the caption grammar (no download); embeddings, when asked
    for, from a table computed once per distinct caption with a text encoder (T5, via
    `skipdit_jax.encoders.text.encode_prompts`).
  - `TextLatentSource`: latents written by `skipdit extract-latents --video --captions ...`:
    each record holds its caption's T5 output, cut after the last real token (the model's
    cross-attention masks the rest, so zeros restore it exactly), and the directory holds
    the empty prompt's encoding (`null_text.npz`).

Both are deterministic: a record depends only on its index (no flips: "left" and "right"
in a caption would be wrong for a mirrored clip), so resuming is exact.

Joint image-video training (`data.images_per_video`, the official `use_image_num`):
`AppendCaptionedImages` appends single frames of random other clips after a record's clip,
with those clips' caption embeddings as "image_text_emb" (I, L, D) / "image_text_mask"
(I, L); both sources give such a frame with `captioned_frame(index, rng)`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Callable, Mapping, Sequence

import grain
import numpy as np

from skipdit_jax import paths
from skipdit_jax.data.latents import LATENTS_EXTRA_FILES, LatentSource
from skipdit_jax.data.moving_digits import CAPTION_WORDS, MovingDigitsSource
from skipdit_jax.errors import ConfigError, UserError

NULL_TEXT_FILE = LATENTS_EXTRA_FILES[0]  # "null_text.npz"
# T5's special ids (pad 0, end of sequence 1, unknown 2), then the caption grammar's words.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
WORD_VOCAB = ("<pad>", "</s>", "<unk>", *CAPTION_WORDS)
_WORD_IDS = {w: i for i, w in enumerate(WORD_VOCAB)}
TOKEN_KEYS = ("ids", "mask", "null_ids", "null_mask")
EMBEDDING_KEYS = ("text_emb", "text_mask", "null_emb", "null_mask")


# ---- the word-level tokenizer ------------------------------------------------------------------
def tokenize_words(captions: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """{"ids", "mask"}: int32 (N, max_length), T5's conventions: the lower-cased words'
    ids (`WORD_VOCAB`, unknown words -> UNK_ID), then EOS_ID, padded with PAD_ID (mask 0).
    A longer caption is cut to max_length - 1 words plus EOS (as a T5 tokenizer truncates);
    the empty caption is just EOS."""
    if max_length < 1:
        raise ConfigError(f"the token length must be >= 1, got {max_length}")
    ids = np.full((len(captions), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(captions), max_length), np.int32)
    for i, caption in enumerate(captions):
        words = [_WORD_IDS.get(w, UNK_ID) for w in str(caption).lower().split()][: max_length - 1] + [EOS_ID]
        ids[i, : len(words)] = words
        mask[i, : len(words)] = 1
    return {"ids": ids, "mask": mask}


# ---- text-encoder tables ------------------------------------------------------------------------
EncodeFn = Callable[[list[str]], Mapping[str, np.ndarray]]


def t5_encode_fn(t5: str, tokenizer: str, max_length: int) -> EncodeFn:
    """`prompts -> {"text_emb" (N, L, D) f32, "text_mask" (N, L) int32}` with the T5
    encoder `t5` (a folder or hf:// spec) and the tokenizer folder `tokenizer`."""
    from skipdit_jax.encoders.t5 import load_t5
    from skipdit_jax.encoders.text import encode_prompts, load_tokenizer

    if not t5 or not tokenizer:
        raise ConfigError("text embeddings need a T5 encoder and its tokenizer (data.t5 and data.tokenizer; --t5 and --tokenizer)")
    tok = load_tokenizer(tokenizer)
    config, params = load_t5(t5)

    def encode(prompts):
        out = encode_prompts(list(prompts), tok, config, params, max_length=max_length)
        return {"text_emb": np.asarray(out["text_emb"], np.float32), "text_mask": np.asarray(out["text_mask"], np.int32)}

    return encode


def embedding_table(captions: Sequence[str], encode: EncodeFn, batch_size: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{caption: (emb (L, D) f32, mask (L,) int32)} for every distinct caption and "" (the
    null prompt), encoded once in batches."""
    unique = sorted(set(captions) | {""})
    table = {}
    for lo in range(0, len(unique), batch_size):
        chunk = unique[lo : lo + batch_size]
        out = encode(chunk)
        for j, c in enumerate(chunk):
            table[c] = (np.asarray(out["text_emb"][j], np.float32), np.asarray(out["text_mask"][j], np.int32))
    return table


# ---- moving digits with captions -----------------------------------------------------------------
class TextMovingDigitsSource:
    """Captioned moving-digits clips (module docstring). Records: "image", "label" and the
    caption as "ids" / "mask" / "null_ids" / "null_mask" (`text_len` tokens of
    `WORD_VOCAB`), or with `encode` as "text_emb" / "text_mask" / "null_emb" / "null_mask"
    from `embedding_table` (the two share the key "null_mask", so a source gives one kind).
    Attributes: base (the `MovingDigitsSource`), captions (one per clip), labels."""

    def __init__(
        self, *, split: str = "train", num_frames: int = 8, image_size: int = 32, seed: int = 0, digit_size: int | None = None,
        text_len: int = 8, encode: EncodeFn | None = None,
    ):
        self.base = MovingDigitsSource(split=split, num_frames=num_frames, image_size=image_size, seed=seed, digit_size=digit_size)
        self.captions = self.base.captions()
        self.labels = self.base.labels
        self.text_len = int(text_len)
        unique = sorted(set(self.captions))
        tokens = tokenize_words(unique + [""], self.text_len)
        self._tokens = {c: (tokens["ids"][j], tokens["mask"][j]) for j, c in enumerate(unique + [""])}
        self._table = embedding_table(self.captions, encode) if encode is not None else None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        rec = self.base[index]
        caption = self.captions[self.base._index(index)]
        if self._table is not None:
            (emb, mask), (null_emb, null_mask) = self._table[caption], self._table[""]
            rec.update(text_emb=emb, text_mask=mask, null_emb=null_emb, null_mask=null_mask)
        else:
            (ids, mask), (null_ids, null_mask) = self._tokens[caption], self._tokens[""]
            rec.update(ids=ids, mask=mask, null_ids=null_ids, null_mask=null_mask)
        return rec

    def captioned_frame(self, index, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frame (H, W, C) float32, caption embedding (L, D), mask (L,)): a uniformly drawn
        frame of clip `index` with the clip's caption (joint images; needs `encode`)."""
        if self._table is None:
            raise ConfigError("joint images with their own captions need caption embeddings (a model trained on text_emb)")
        rec = self[index]
        return rec["image"][int(rng.integers(len(rec["image"])))], rec["text_emb"], rec["text_mask"]

    def __repr__(self) -> str:
        kind = "embeddings" if self._table is not None else "word tokens"
        return f"TextMovingDigitsSource({self.base!r}, {kind}, {self.text_len} tokens)"


# ---- latents with text --------------------------------------------------------------------------
def encode_null_text(emb: np.ndarray, mask: np.ndarray) -> bytes:
    """The bytes of `null_text.npz`: the null prompt's (L, D) embedding and (L,) mask."""
    buf = io.BytesIO()
    np.savez(buf, text_emb=np.asarray(emb, np.float32), text_mask=np.asarray(mask, np.int32))
    return buf.getvalue()


def trim_text(emb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A caption's embedding and mask cut after the last real token (what a record stores)."""
    n = int(np.max(np.nonzero(np.asarray(mask))[0], initial=-1)) + 1
    return np.asarray(emb, np.float32)[:n], np.asarray(mask, np.int32)[:n]


class TextLatentSource:
    """Video latents with their captions' text embeddings (`extract-latents --video
    --captions`). Record i: {"image", "label", "text_emb" (L, D), "text_mask" (L,),
    "null_emb", "null_mask"}, the stored embedding zero-padded back to the extraction's
    length L (latents.json "text_len"). Attributes: latents (the `LatentSource`), text_len,
    text_dim, labels, has_flipped."""

    def __init__(self, path: paths.PathLike, *, cache_dir: paths.PathLike | None = None):
        self.latents = LatentSource(path, cache_dir=cache_dir)
        meta = self.latents.metadata if isinstance(self.latents.metadata, dict) else {}
        if "text_len" not in meta or "text_dim" not in meta:
            raise UserError(
                f"the latents at {path} hold no text embeddings (latents.json has no text_len); "
                "extract them with --captions FILE --t5 SPEC --tokenizer DIR"
            )
        self.text_len, self.text_dim = int(meta["text_len"]), int(meta["text_dim"])
        null_file = paths.as_path(path) / NULL_TEXT_FILE
        if not null_file.exists():
            raise UserError(f"{null_file} is missing: the null prompt's embedding of these latents")
        with np.load(io.BytesIO(null_file.read_bytes()), allow_pickle=False) as npz:
            self.null_emb, self.null_mask = npz["text_emb"].astype(np.float32), npz["text_mask"].astype(np.int32)
        if self.null_emb.shape != (self.text_len, self.text_dim):
            raise UserError(f"{null_file} holds a {self.null_emb.shape} embedding, expected {(self.text_len, self.text_dim)}")
        self.labels, self.has_flipped = self.latents.labels, self.latents.has_flipped

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        rec = self.latents[index]
        if "text_emb" not in rec:
            raise UserError(f"latent record {index} holds no text embedding")
        emb = np.zeros((self.text_len, self.text_dim), np.float32)
        mask = np.zeros((self.text_len,), np.int32)
        n = rec["text_emb"].shape[0]
        emb[:n], mask[:n] = rec["text_emb"], rec["text_mask"]
        rec.update(text_emb=emb, text_mask=mask, null_emb=self.null_emb, null_mask=self.null_mask)
        return rec

    def captioned_frame(self, index, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frame latent (h, w, c), caption embedding (text_len, text_dim), mask (text_len,)):
        a uniformly drawn frame of record `index` (never its flipped latent) with the
        record's caption (joint images)."""
        rec = self[index]
        return rec["image"][int(rng.integers(len(rec["image"])))], rec["text_emb"], rec["text_mask"]

    def __repr__(self) -> str:
        return f"TextLatentSource({self.latents!r}, text {self.text_len} x {self.text_dim})"


# ---- joint images with their own captions ------------------------------------------------------------
class AppendCaptionedImages(grain.transforms.RandomMap):
    """Joint image-video training of a text model: appends `count` single frames after the
    record's clip, each a uniformly drawn frame of a uniformly drawn record (any record,
    the clip's own included, as the official sampler), with that record's caption:
    "image_text_emb" float32 (count, L, D) and "image_text_mask" int32 (count, L). Every
    draw comes from the example's rng, so a batch depends only on the seed and its position.
    The source gives the frames (`captioned_frame(index, rng)`); images are never flipped."""

    def __init__(self, source, count: int):
        if not hasattr(source, "captioned_frame"):
            raise ConfigError(
                f"joint images with their own captions need a captioned source (text latents or text_moving_digits), not {source!r}"
            )
        self.source, self.count = source, int(count)

    def random_map(self, record, rng: np.random.Generator):
        video = np.asarray(record["image"])
        if video.ndim != 4:
            raise ConfigError(f"joint images (data.images_per_video) need video records (F, H, W, C), got shape {video.shape}")
        picks = rng.integers(len(self.source), size=self.count)
        frames, embs, masks = zip(*(self.source.captioned_frame(int(j), rng) for j in picks))
        return {
            **record,
            "image": np.concatenate([video, np.stack(frames).astype(video.dtype)], axis=0),
            "image_text_emb": np.stack(embs).astype(np.float32),
            "image_text_mask": np.stack(masks).astype(np.int32),
        }


# ---- caption files --------------------------------------------------------------------------------
_NAME_COLUMNS = ("video", "file", "name", "path")
_CAPTION_COLUMNS = ("caption", "text", "prompt")


def read_captions(path: paths.PathLike) -> dict[str, str]:
    """{video name: caption} from a JSON object ({"clip1.mp4": "a dog ...", ...}), a JSON
    list of {"video"|"file"|"name"|"path": ..., "caption"|"text"|"prompt": ...}, or a CSV
    file with a header naming such a column pair."""
    p = paths.as_path(path)
    if not p.exists():
        raise UserError(f"caption file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
            rows = list(data.items()) if isinstance(data, dict) else [_pick(r, p) for r in data]
        elif p.suffix.lower() == ".csv":
            rows = [_pick(r, p) for r in csv.DictReader(io.StringIO(text))]
        else:
            raise UserError(f"caption file {p} must be .json or .csv")
    except (json.JSONDecodeError, csv.Error, AttributeError, TypeError) as e:
        raise UserError(f"cannot read captions from {p}: {e}") from None
    out = {}
    for name, caption in rows:
        if not isinstance(caption, str):
            raise UserError(f"{p}: the caption of {name!r} is not text")
        out[str(name)] = caption
    if not out:
        raise UserError(f"caption file {p} holds no captions")
    return out


def _pick(row, p) -> tuple[str, str]:
    name = next((row[k] for k in _NAME_COLUMNS if k in row), None)
    caption = next((row[k] for k in _CAPTION_COLUMNS if k in row), None)
    if name is None or caption is None:
        raise UserError(f"{p}: every row needs a name column ({'/'.join(_NAME_COLUMNS)}) and a caption column ({'/'.join(_CAPTION_COLUMNS)})")
    return name, caption


def caption_for(video: paths.PathLike, root: paths.PathLike, captions: Mapping[str, str]) -> str | None:
    """The caption of `video` under `root`: keyed by its path relative to root (POSIX), its
    file name, or its stem, whichever the mapping holds first; None if none."""
    v, r = paths.as_path(video), paths.as_path(root)
    rel = str(v)[len(str(r)) :].lstrip("/") if str(v).startswith(str(r)) else v.name
    for key in (rel, v.name, v.stem):
        if key in captions:
            return captions[key]
    return None
