"""Prompts -> T5 embeddings: tokenizer loading, encode_prompts against transformers, the
embedding cache file and `skipdit encode-text`."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel

from skipdit_jax import cli
from skipdit_jax.encoders.t5 import t5_from_torch
from skipdit_jax.encoders.text import (
    encode_prompts,
    load_text_embeddings,
    load_tokenizer,
    save_text_embeddings,
    text_condition,
    tokenize,
)
from skipdit_jax.errors import UserError

WORDS = "a red blue green cat dog bird runs jumps flies over under the city forest river".split()
WORDS += "at night in morning slowly camera pans".split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A T5 tokenizer folder like Latte-1's tokenizer/: a SentencePiece unigram model
    (pad 0, eos 1, unk 2) trained on generated captions, as spiece.model."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 15))) for _ in range(300)]
    (root / "captions.txt").write_text("\n".join(captions))
    folder = root / "tokenizer"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(root / "captions.txt"),
        model_prefix=str(folder / "spiece"),
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()
    return root


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A tiny random T5 v1.1 encoder saved with save_pretrained (vocab 160 > the tokenizer's 148)."""
    torch.manual_seed(1)
    hf = HFT5Config(
        vocab_size=160,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        attn_implementation="eager",
    )
    model = T5EncoderModel(hf).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("t5") / "text_encoder"
    model.save_pretrained(folder)
    return folder, model


def test_tokenizer_and_encode_prompts_match_transformers(tokenizer_dir, t5_folder, caplog):
    tok = load_tokenizer(tokenizer_dir)  # finds tokenizer/ under a pipeline root
    folder, model = t5_folder
    cfg, params = t5_from_torch(model.state_dict(), relative_attention_max_distance=20)
    long = " ".join(["the cat runs over the city"] * 4)
    prompts = ["A Red Cat runs  ", "", "dog flies at night", long]
    with caplog.at_level(logging.WARNING):
        enc = encode_prompts(prompts, tok, cfg, params, max_length=12, batch_size=3)  # batches of 3: the last padded
    assert enc["text_emb"].shape == (4, 12, 32) and enc["text_emb"].dtype == np.float32
    assert enc["text_mask"].dtype == np.int32 and enc["text_mask"].sum(1).tolist() == [5, 1, 5, 12]
    full = len(tok(long)["input_ids"])
    warned = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert len(warned) == 1 and repr(long) in warned[0] and f"last {full - 12} tokens were cut" in warned[0]
    ids, mask = tokenize(prompts, tok, 12)
    assert ids[0, :5].tolist() == tok("a red cat runs")["input_ids"] and ids[0, 4] == 1 and (ids[0, 5:] == 0).all()
    np.testing.assert_array_equal(mask, enc["text_mask"])
    assert ids[3, -1] == 1  # truncated, still EOS-terminated
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64))
        ).last_hidden_state
    np.testing.assert_allclose(enc["text_emb"], ref.numpy(), atol=3e-5)
    with pytest.raises(UserError, match="has 148 tokens but the T5 encoder.s vocabulary has 100"):
        encode_prompts(["cat"], tok, cfg.replace(vocab_size=100), params)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "none")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"no T5 tokenizer in .*needs tokenizer.json or spiece.model") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_embedding_file(tmp_path, suffix):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 6, 8)).astype(np.float32)
    mask = np.array([[1] * k + [0] * (6 - k) for k in (3, 1, 6, 2)], np.int32)
    prompts = ["a cat", "", 'über den Fluss "quoted"', "a cat"]  # a repeat: stored once (the first)
    path = tmp_path / f"emb{suffix}"
    save_text_embeddings(path, prompts, emb, mask, metadata={"max_length": 6})
    cache = load_text_embeddings(path)
    assert cache.prompts == prompts[:3] and cache.metadata == {"max_length": 6} and "" in cache and "dog" not in cache
    got = cache.lookup(['über den Fluss "quoted"', "a cat"])
    np.testing.assert_array_equal(got["text_emb"], emb[[2, 0]])
    np.testing.assert_array_equal(got["text_mask"], mask[[2, 0]])
    cond = text_condition(cache, ["a cat", "a cat"])
    np.testing.assert_array_equal(cond["null_emb"], emb[[1, 1]])
    np.testing.assert_array_equal(cond["null_mask"], mask[[0, 0]])  # official: cut to the prompt's length
    np.testing.assert_array_equal(text_condition(cache, ["a cat"], null_mask="own")["null_mask"], mask[[1]])
    with pytest.raises(UserError, match="'dog' is not in the embedding file"):
        cache.lookup(["dog"])
    (tmp_path / f"bad{suffix}").write_bytes(b"not an embedding file")
    with pytest.raises(UserError, match="is not a text embedding file"):
        load_text_embeddings(tmp_path / f"bad{suffix}")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_encode_text_command(tokenizer_dir, t5_folder, tmp_path, capsys):
    folder, model = t5_folder
    (tmp_path / "prompts.txt").write_text("a red cat runs\n\nthe dog flies at night\n")
    out = tmp_path / "emb.safetensors"
    argv = [
        "skipdit",
        "encode-text",
        f"--t5={folder.parent}",
        f"--tokenizer={tokenizer_dir / 'tokenizer'}",
        f"--prompts={tmp_path / 'prompts.txt'}",
        f"--out={out}",
        "--max-length=16",
    ]
    assert cli.main(argv) == 0
    assert "encoded 3 prompt(s)" in capsys.readouterr().out
    cache = load_text_embeddings(out)
    assert cache.prompts == ["a red cat runs", "the dog flies at night", ""] and cache.text_emb.shape == (3, 16, 32)
    cfg, params = t5_from_torch(model.state_dict(), relative_attention_max_distance=20)
    direct = encode_prompts(cache.prompts, load_tokenizer(tokenizer_dir), cfg, params, max_length=16)
    np.testing.assert_allclose(cache.text_emb, direct["text_emb"], atol=1e-5)
    np.testing.assert_array_equal(cache.text_mask, direct["text_mask"])
    # --append adds only what is new; an existing file is otherwise refused.
    assert cli.main(argv[:4] + ["--prompt=a green bird", f"--out={out}", "--max-length=16", "--append"]) == 0
    assert load_text_embeddings(out).prompts == cache.prompts + ["a green bird"]
    capsys.readouterr()
    for bad, message in [
        (argv[:4] + [f"--out={out}"], "give prompts with --prompt TEXT"),
        (argv, "already exists"),
        (
            argv[:3] + [f"--tokenizer={tmp_path}", f"--prompts={tmp_path / 'prompts.txt'}", f"--out={tmp_path / 'x.npz'}"],
            "no T5 tokenizer",
        ),
        (argv[:4] + ["--prompt=x", f"--out={tmp_path / 'x.txt'}"], "must end in .safetensors or .npz"),
        (
            argv[:2] + [f"--t5={tmp_path / 'nowhere'}"] + argv[3:4] + ["--prompt=x", f"--out={tmp_path / 'y.npz'}"],
            "does not exist",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], (bad, err)
