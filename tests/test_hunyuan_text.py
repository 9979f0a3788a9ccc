"""Hunyuan-DiT's text encoders: both folder layouts, the tokenizers against transformers /
SentencePiece, the embeddings against transformers' BertModel and MT5EncoderModel run as the
official pipeline runs them, the condition dict, mT5 in load_t5, and the one-line errors."""

from __future__ import annotations

import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch
from transformers import BertConfig as HFBertConfig
from transformers import BertModel, MT5EncoderModel
from transformers import MT5Config as HFMT5Config

from skipdit_jax.encoders.hunyuan_text import (
    CLIP_MAX_LENGTH,
    DEFAULT_NEGATIVE_PROMPT,
    T5_MAX_LENGTH,
    encode_hunyuan_prompts,
    hunyuan_condition,
    load_hunyuan_text_encoders,
)
from skipdit_jax.encoders.t5 import T5Config
from skipdit_jax.encoders.t5_io import load_t5
from skipdit_jax.errors import ConfigError, HubUnavailableError, UserError
from skipdit_jax.models.hunyuan_family import CONDITION_KEYS

WORDS = "a red blue cat dog bird runs over the city river at night camera".split()
HANZI = list("一个宇航员在骑马的猫狗红色城市夜晚") + sorted(set(DEFAULT_NEGATIVE_PROMPT))
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LONG = " ".join(["the red cat runs over the city at night"] * 40)  # > 77 BERT and > 256 mT5 tokens


def _perturb(model):
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb every tensor
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The four parts, tiny and random: BERT vocab.txt + tokenizer_config.json (model_max_length
    77, as the official tokenizer/), a SentencePiece unigram model with mT5's ids (pad 0, eos 1,
    unk 2) trained on mixed captions, a BertModel and an MT5EncoderModel."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("parts")
    vocab = SPECIAL + HANZI + WORDS + ["##s", "##ing"]
    (root / "clip_tok").mkdir()
    (root / "clip_tok" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (root / "clip_tok" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 77, "tokenize_chinese_chars": True}))
    rng = random.Random(0)
    pool = WORDS + HANZI
    lines = [" ".join(rng.choice(pool) for _ in range(rng.randint(3, 12))) for _ in range(400)] + [DEFAULT_NEGATIVE_PROMPT]
    (root / "lines.txt").write_text("\n".join(lines))
    (root / "t5_tok").mkdir()
    spm.SentencePieceTrainer.train(input=str(root / "lines.txt"), model_prefix=str(root / "t5_tok" / "spiece"), vocab_size=90,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                   minloglevel=2)
    (root / "t5_tok" / "spiece.vocab").unlink()
    torch.manual_seed(0)
    bert = _perturb(BertModel(HFBertConfig(vocab_size=len(vocab) + 3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=48, max_position_embeddings=80, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0, attn_implementation="eager")))
    mt5 = _perturb(MT5EncoderModel(HFMT5Config(vocab_size=192, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
                                               relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                               dropout_rate=0.0, attn_implementation="eager")))
    return root, bert, mt5


@pytest.fixture(scope="module")
def folders(parts, tmp_path_factory):
    """The same parts in the official layout (HunyuanDiT-v1.2/t2i/...) and the diffusers one."""
    root, bert, mt5 = parts
    out = tmp_path_factory.mktemp("layouts")
    t2i = out / "HunyuanDiT-v1.2" / "t2i"
    bert.save_pretrained(t2i / "clip_text_encoder")
    shutil.copytree(root / "clip_tok", t2i / "tokenizer")
    mt5.save_pretrained(t2i / "mt5", safe_serialization=False)  # the official mt5/ holds pytorch_model.bin
    shutil.copy(root / "t5_tok" / "spiece.model", t2i / "mt5" / "spiece.model")
    diff = out / "HunyuanDiT-v1.2-Diffusers"
    bert.save_pretrained(diff / "text_encoder")
    mt5.save_pretrained(diff / "text_encoder_2")
    shutil.copytree(root / "clip_tok", diff / "tokenizer")
    shutil.copytree(root / "t5_tok", diff / "tokenizer_2")
    (diff / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanDiTPipeline"}))
    return t2i.parent, diff


def official_reference(root, bert, mt5, texts):
    """hydit/diffusion/pipeline.py encode_prompt, independently: the (slow) BertTokenizer and the
    SentencePiece model itself (pieces + </s>, cut to keep </s>, padded with 0), then the
    PyTorch encoders with the mask, last hidden state."""
    import sentencepiece as spm
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tok = BertTokenizerLegacy.from_pretrained(str(root / "clip_tok"))
    clip = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_attention_mask=True,
               return_tensors="pt")
    sp = spm.SentencePieceProcessor(model_file=str(root / "t5_tok" / "spiece.model"))
    ids = np.zeros((len(texts), 256), np.int64)
    for i, t in enumerate(texts):
        row = sp.encode(t)[:255] + [1]
        ids[i, : len(row)] = row
    t5_ids, t5_mask = torch.from_numpy(ids), torch.from_numpy((ids != 0).astype(np.int64))
    with torch.no_grad():
        return {
            "clip_emb": bert(clip.input_ids, attention_mask=clip.attention_mask)[0].numpy(),
            "clip_mask": clip.attention_mask.numpy(),
            "t5_emb": mt5(input_ids=t5_ids, attention_mask=t5_mask)[0].numpy(),
            "t5_mask": t5_mask.numpy(),
        }


def test_encode_matches_the_official_pipeline(parts, folders, caplog):
    root, bert, mt5 = parts
    enc = load_hunyuan_text_encoders(folders[0])  # the parent of t2i/
    assert enc.bert_config.hidden_size == 32 and enc.t5_config.d_model == 24 and enc.t5_config.num_heads == 3
    prompts = ["  一个宇航员在骑马，a Red cat  ", "", LONG]
    with caplog.at_level(logging.WARNING):
        out = encode_hunyuan_prompts(enc, prompts, batch_size=2)  # batches of 2: the last one padded
    warned = [r.getMessage() for r in caplog.records if "takes at most" in r.getMessage()]
    assert len(warned) == 2 and "CLIP text encoder takes at most 77 tokens" in warned[0] and repr(LONG) in warned[0]
    assert "mT5 text encoder takes at most 256 tokens" in warned[1]
    ref = official_reference(root, bert, mt5, [p.strip() for p in prompts])
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "clip_emb": ((3, CLIP_MAX_LENGTH, 32), np.float32), "clip_mask": ((3, CLIP_MAX_LENGTH), np.int32),
        "t5_emb": ((3, T5_MAX_LENGTH, 24), np.float32), "t5_mask": ((3, T5_MAX_LENGTH), np.int32)}
    for key in ("clip_mask", "t5_mask"):
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
    assert out["clip_mask"].sum(1).tolist()[1:] == [2, 77] and out["t5_mask"].sum(1).tolist()[1:] == [1, 256]
    # Every position, padded ones included (they are masked keys, as in transformers).
    np.testing.assert_allclose(out["clip_emb"], ref["clip_emb"], atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(out["t5_emb"], ref["t5_emb"], atol=5e-5, rtol=1e-5)


def test_condition_and_the_diffusers_layout(parts, folders):
    root, bert, mt5 = parts
    enc = load_hunyuan_text_encoders(folders[1])
    cond = hunyuan_condition(enc, ["a red cat ", "狗在城市"])
    assert sorted(cond) == sorted(CONDITION_KEYS)
    ref = official_reference(root, bert, mt5, ["a red cat", "狗在城市", DEFAULT_NEGATIVE_PROMPT])
    for key in ("clip_emb", "clip_mask", "t5_emb", "t5_mask"):
        np.testing.assert_allclose(cond[key], ref[key][:2], atol=5e-5, err_msg=key)
        assert cond[f"null_{key}"].shape == cond[key].shape and cond[f"null_{key}"].dtype == cond[key].dtype
        for row in cond[f"null_{key}"]:  # the negative prompt, one row per prompt
            np.testing.assert_allclose(row, ref[key][2], atol=5e-5, err_msg=key)
    assert cond["null_clip_mask"][0].sum() > 20  # the Chinese negative prompt, not ""
    same = hunyuan_condition(enc, "a red cat", negative_prompt="")  # "" means the default, as the official sampler
    np.testing.assert_array_equal(same["null_t5_mask"], cond["null_t5_mask"][:1])
    own = hunyuan_condition(enc, "a red cat", negative_prompt="dog")
    assert own["null_clip_mask"][0].sum() == 3
    # Explicit parts override the folder's; the official folder's t2i/ gives the same arrays.
    mixed = load_hunyuan_text_encoders(folders[1], t5_tokenizer=folders[0] / "t2i" / "mt5")
    np.testing.assert_array_equal(encode_hunyuan_prompts(mixed, "狗")["t5_mask"], encode_hunyuan_prompts(enc, "狗")["t5_mask"])


def test_mt5_in_load_t5(parts, tmp_path):
    _, _, mt5 = parts
    mt5.save_pretrained(tmp_path / "mt5")
    cfg, params = load_t5(tmp_path / "mt5")
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_heads, cfg.relative_attention_max_distance) == (
        192, 24, 8, 40, 3, 20)
    from skipdit_jax.encoders.t5 import encode

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 192, (2, 30))
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        ref = mt5(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(encode(cfg, params, ids, mask)), ref, atol=5e-5, rtol=1e-5)
    hf = json.loads((tmp_path / "mt5" / "config.json").read_text())
    assert hf["model_type"] == "mt5" and T5Config.from_hf_config(hf).d_ff == 40
    xl = {"model_type": "mt5", "d_ff": 5120, "d_kv": 64, "d_model": 2048, "num_heads": 32, "num_layers": 24,
          "vocab_size": 250112, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "layer_norm_epsilon": 1e-06}  # google/mt5-xl's config.json fields
    assert T5Config.from_hf_config(xl) == T5Config.mt5_xl()
    with pytest.raises(ConfigError, match="model_type is 'umt5'"):
        T5Config.from_hf_config({**xl, "model_type": "umt5"})


def test_missing_parts_are_one_line_errors(folders, tmp_path):
    t2i = tmp_path / "t2i"
    shutil.copytree(folders[0] / "t2i", t2i)

    def error(*args, **kw):
        with pytest.raises(UserError) as e:
            load_hunyuan_text_encoders(*args, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    (t2i / "mt5" / "spiece.model").rename(tmp_path / "spiece.model")
    assert f"no mT5 tokenizer in {t2i / 'mt5'}" in error(tmp_path)
    (tmp_path / "spiece.model").rename(t2i / "mt5" / "spiece.model")
    (t2i / "tokenizer" / "vocab.txt").unlink()
    assert f"no CLIP tokenizer vocabulary {t2i / 'tokenizer' / 'vocab.txt'}" in error(t2i)
    assert "no mT5 encoder folder" in error(t2i, clip_tokenizer=folders[1] / "tokenizer", mt5=tmp_path / "nothing")
    assert "does not exist" in error(tmp_path / "nowhere")
    assert "no Hunyuan-DiT folder given and no mt5, t5_tokenizer path" in error(clip=t2i, clip_tokenizer=t2i)
    with pytest.raises(UserError, match="no prompts"):
        encode_hunyuan_prompts(load_hunyuan_text_encoders(folders[1]), [])
    with pytest.raises(HubUnavailableError):  # the suite runs with HF_HUB_OFFLINE=1
        load_hunyuan_text_encoders("hf://no-such-org/no-such-hunyuan", cache_dir=str(tmp_path / "hub"))


def test_hub_specs_fetch_configs_and_tokenizers_then_the_weights(folders, tmp_path, monkeypatch):
    """hf:// specs of either layout, with a stand-in Hub: each snapshot_download copies only
    the files its allow_patterns match (fnmatch, as huggingface_hub) into a cache folder."""
    import fnmatch

    import huggingface_hub

    repos = {"org/official": folders[0], "org/diffusers": folders[1]}
    calls = []

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=()):
        src, dst = repos[repo_id], tmp_path / "cache" / repo_id
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                calls.append((repo_id, rel))
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dst / rel)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    local = load_hunyuan_text_encoders(folders[1])
    want = encode_hunyuan_prompts(local, "a red cat")
    for spec in ("hf://org/diffusers", "hf://org/official", "hf://org/official/t2i"):
        calls.clear()
        got = encode_hunyuan_prompts(load_hunyuan_text_encoders(spec), "a red cat")
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=f"{spec} {key}")
        weights = sorted(rel for _, rel in calls if rel.endswith((".bin", ".safetensors")))
        assert len(weights) == 2 and len(set(weights)) == 2, (spec, weights)  # each encoder's weights, once


def test_encode_text_command_and_embedding_file(folders, tmp_path, capsys):
    from skipdit_jax import cli
    from skipdit_jax.encoders.hunyuan_text import load_hunyuan_embeddings

    out = tmp_path / "emb.safetensors"
    argv = ["skipdit", "encode-text", "--family=hunyuan", f"--pipeline={folders[0]}", "--prompt= a red cat ", f"--out={out}"]
    assert cli.main(argv) == 0
    assert "encoded 2 prompt(s)" in capsys.readouterr().out
    saved = load_hunyuan_embeddings(out)
    assert saved.prompts == ["a red cat", DEFAULT_NEGATIVE_PROMPT] and saved.arrays["t5_emb"].shape == (2, 256, 24)
    direct = hunyuan_condition(load_hunyuan_text_encoders(folders[1]), ["a red cat", "a red cat"])
    from_file = saved.condition(["a red cat ", "a red cat"])
    assert sorted(from_file) == sorted(direct)
    for key, value in direct.items():
        np.testing.assert_allclose(from_file[key], value, atol=1e-6, err_msg=key)
    assert cli.main(argv[:4] + ["--prompt=狗", f"--out={out}", "--append"]) == 0
    assert load_hunyuan_embeddings(out).prompts == ["a red cat", DEFAULT_NEGATIVE_PROMPT, "狗"]
    capsys.readouterr()
    for bad, message in [(argv, "already exists"), (argv[:3] + argv[4:], "--pipeline is required"),
                         (argv + ["--t5=x", "--overwrite"], "drop --t5")]:
        with pytest.raises(SystemExit) as e:
            cli.main(bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], (bad, err)
    with pytest.raises(UserError, match="not in the embedding file"):
        saved.condition(["a blue dog"])
