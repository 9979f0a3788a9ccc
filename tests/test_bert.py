"""The BERT encoder against transformers' PyTorch BertModel, its converter and loader."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BertConfig as HFBertConfig
from transformers import BertForMaskedLM, BertModel

from skipdit_jax.encoders.bert import BertConfig, BertEncoder, bert_from_torch, bert_to_torch, load_bert
from skipdit_jax.errors import CheckpointError, ConfigError, HubUnavailableError

TINY = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=20,
    type_vocab_size=2,
)


def tiny_hf_config(**kw):
    return HFBertConfig(**{**TINY, **kw}, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = BertModel(tiny_hf_config()).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0) and biases at 0: perturb every tensor
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def ids_and_mask(seed=0, batch=3, length=13):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY["vocab_size"], (batch, length))
    mask = np.zeros((batch, length), np.int64)
    for i, n in enumerate([length, 7, 1][:batch]):  # full, padded, only one real token
        mask[i, :n] = 1
    return ids, mask


def encode(cfg, params, ids, mask, types=None):
    fn = jax.jit(lambda p, i, m, t: BertEncoder(cfg).apply({"params": p}, i, m, t))
    return fn(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), None if types is None else jnp.asarray(types))


def torch_out(model, ids, mask, types=None):
    kw = {} if types is None else {"token_type_ids": torch.from_numpy(types)}
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw).last_hidden_state.numpy()


def test_matches_transformers(hf_model):
    cfg, params = bert_from_torch(hf_model.state_dict(), num_attention_heads=4)
    assert cfg == BertConfig(**TINY)
    ids, mask = ids_and_mask()
    ref = torch_out(hf_model, ids, mask)
    out = encode(cfg, params, ids, mask)
    assert out.dtype == jnp.float32 and out.shape == (3, 13, 32)
    # Every position, padded ones included (padding masks keys only, as transformers); rows 1
    # and 2 are padded, so an ignored or misapplied mask changes their real positions too.
    np.testing.assert_allclose(np.asarray(out), ref, atol=5e-5, rtol=1e-5)
    assert np.abs(np.asarray(encode(cfg, params, ids, np.ones_like(mask)))[1, :7] - ref[1, :7]).max() > 1e-2
    # Token types (Hunyuan passes none, i.e. zeros), and bf16 compute with a float32 stream.
    types = (np.arange(13)[None] >= 5).astype(np.int64).repeat(3, 0)
    ref_types = torch_out(hf_model, ids, mask, types)
    np.testing.assert_allclose(np.asarray(encode(cfg, params, ids, mask, types)), ref_types, atol=5e-5)
    cfg16, params16 = bert_from_torch(hf_model.state_dict(), num_attention_heads=4, dtype="bfloat16", param_dtype="bfloat16")
    out16 = np.asarray(encode(cfg16, params16, ids, mask))
    assert params16["blocks"]["q"].dtype == jnp.bfloat16 and out16.dtype == np.float32
    assert np.linalg.norm(out16 - ref) / np.linalg.norm(ref) < 0.03
    cfg_r = cfg.replace(remat_policy="nothing_saveable", scan_unroll=0)
    np.testing.assert_allclose(np.asarray(encode(cfg_r, params, ids, mask)), np.asarray(out), atol=1e-6)


def test_round_trip_and_pretraining_checkpoint(hf_model):
    cfg, params = bert_from_torch(hf_model.state_dict(), num_attention_heads=4)
    back = bert_to_torch(cfg, params)
    sd = hf_model.state_dict()
    assert set(back) == {k for k in sd if not k.startswith("pooler.")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)
    # A BertForMaskedLM state dict: the `bert.` prefix is stripped and the `cls.` head ignored.
    mlm = BertForMaskedLM(tiny_hf_config()).state_dict()
    mlm.update({f"bert.{k}": v for k, v in sd.items()})
    assert any(k.startswith("cls.") for k in mlm)
    _, params2 = bert_from_torch(mlm, num_attention_heads=4)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, params2))


def test_bad_checkpoints_and_configs_are_one_line_errors(hf_model):
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}

    def error(state, **kw):
        with pytest.raises(CheckpointError) as e:
            bert_from_torch(state, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    bad = {**sd, "encoder.layer.1.output.dense.weight": np.zeros((32, 40), np.float32)}
    assert "wrong shapes: encoder.layer.1.output.dense.weight (32, 40) (expected (32, 48))" in error(bad, num_attention_heads=4)
    missing = {k: v for k, v in sd.items() if k != "encoder.layer.2.attention.self.key.bias"}
    assert "missing keys: encoder.layer.2.attention.self.key.bias" in error(missing, num_attention_heads=4)
    assert "unexpected keys: encoder.layer.0.extra" in error({**sd, "encoder.layer.0.extra": np.zeros(3)}, num_attention_heads=4)
    assert "not a BERT checkpoint" in error({k: v for k, v in sd.items() if "word" not in k})
    assert "says hidden_size=64 but the weights have hidden_size=32" in error(sd, hidden_size=64)
    assert "not a multiple of num_attention_heads" in error(sd, num_attention_heads=5)
    with pytest.raises(ConfigError, match="model_type is 't5'"):
        BertConfig.from_hf_config({"model_type": "t5"})
    with pytest.raises(ConfigError, match="only 'absolute'"):
        BertConfig.from_hf_config({"position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="hidden_act"):
        BertConfig(hidden_act="relu")
    cfg = BertConfig(**TINY)
    with pytest.raises(ValueError, match="only 20 positions"):
        BertEncoder(cfg).init(jax.random.key(0), jnp.zeros((1, 21), jnp.int32))


# Hunyuan-DiT's t2i/clip_text_encoder/config.json (its fields that are not dropout / pooler / ids),
# as published with the model and copied in ComfyUI's comfy/text_encoders/hydit_clip.json.
HUNYUAN_CLIP_CONFIG = {
    "_name_or_path": "hfl/chinese-roberta-wwm-ext-large", "architectures": ["BertModel"], "hidden_act": "gelu",
    "hidden_size": 1024, "intermediate_size": 4096, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "model_type": "bert", "num_attention_heads": 16, "num_hidden_layers": 24, "pad_token_id": 0,
    "position_embedding_type": "absolute", "torch_dtype": "float32", "type_vocab_size": 2, "vocab_size": 47020,
}


def test_presets_and_init():
    hunyuan = BertConfig.hunyuan_clip()
    assert BertConfig.from_hf_config(HUNYUAN_CLIP_CONFIG) == hunyuan and hunyuan.head_dim == 64
    hf = tiny_hf_config(vocab_size=47020, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=512).to_dict()
    assert BertConfig.from_hf_config(hf) == hunyuan
    cfg = BertConfig(**TINY)
    params = BertEncoder(cfg).init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))["params"]
    back = bert_to_torch(cfg, params)  # the initialised tree has exactly the transformers layout
    BertModel(tiny_hf_config(), add_pooling_layer=False).load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()})


def test_load_folders(hf_model, tmp_path):
    # Hunyuan-DiT layout: t2i/clip_text_encoder/, here saved in safetensors shards with an index.
    hf_model.save_pretrained(tmp_path / "t2i" / "clip_text_encoder", max_shard_size="20KB")
    assert (tmp_path / "t2i" / "clip_text_encoder" / "model.safetensors.index.json").exists()
    ids, mask = ids_and_mask(1)
    ref = torch_out(hf_model, ids, mask)
    for where in (tmp_path, tmp_path / "t2i", tmp_path / "t2i" / "clip_text_encoder"):
        cfg, params = load_bert(where)
        assert cfg.num_attention_heads == 4  # from config.json (not visible in the shapes)
    np.testing.assert_allclose(np.asarray(encode(cfg, params, ids, mask)), ref, atol=5e-5)
    hf_model.save_pretrained(tmp_path / "diffusers" / "text_encoder")  # HunyuanDiTPipeline layout
    assert load_bert(tmp_path / "diffusers")[0] == cfg
    hf_model.save_pretrained(tmp_path / "bin", safe_serialization=False)  # pytorch_model.bin, read safely
    cfg_b, params_b = load_bert(tmp_path / "bin", param_dtype="bfloat16")
    assert params_b["word_embeddings"].dtype == jnp.bfloat16
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_bert(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(tiny_hf_config().to_json_string())
    with pytest.raises(CheckpointError, match="no BERT weights"):
        load_bert(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_bert(tmp_path / "nothing")
    with pytest.raises(HubUnavailableError):  # the suite runs with HF_HUB_OFFLINE=1
        load_bert("hf://no-such-org/no-such-bert/clip_text_encoder", cache_dir=str(tmp_path / "hub"))
