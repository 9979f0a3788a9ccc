"""The T5 v1.1 encoder against transformers' PyTorch T5EncoderModel, its converter and loader."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel, T5ForConditionalGeneration

from skipdit_jax.encoders.t5 import (
    PARAM_AXES,
    T5Config,
    T5Encoder,
    load_t5,
    param_shapes,
    relative_position_buckets,
    t5_from_torch,
    t5_to_torch,
)
from skipdit_jax.errors import CheckpointError, ConfigError, HubUnavailableError

TINY = dict(
    vocab_size=160,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)


def tiny_hf_config(**kw):
    return HFT5Config(**{**TINY, **kw}, feed_forward_proj="gated-gelu", dropout_rate=0.0, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = T5EncoderModel(tiny_hf_config()).eval()
    with torch.no_grad():  # non-trivial norms (ones at init) and larger weights than T5's init
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


def encode(cfg, params, ids, mask):
    """The jitted encoder (one compilation: faster than eager op-by-op dispatch)."""
    return jax.jit(lambda p, i, m: T5Encoder(cfg).apply({"params": p}, i, m))(
        params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    )


def torch_out(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


def test_matches_transformers(hf_model):
    cfg, params = t5_from_torch(hf_model.state_dict(), relative_attention_max_distance=20)
    assert cfg == T5Config(**TINY)
    ids, mask = ids_and_mask()
    ref = torch_out(hf_model, ids, mask)
    out = encode(cfg, params, ids, mask)
    assert out.dtype == jnp.float32 and out.shape == (3, 13, 32)
    # Every position, padded ones included: padding masks keys only (as transformers), so a
    # padded query's output is defined and the same in both. Rows 1 and 2 are padded: an
    # ignored or misapplied mask would change their real positions too.
    np.testing.assert_allclose(np.asarray(out), ref, atol=3e-5, rtol=1e-5)
    # bf16 compute with bf16 weights: the float32 residual stream keeps it close.
    cfg16, params16 = t5_from_torch(
        hf_model.state_dict(), relative_attention_max_distance=20, dtype="bfloat16", param_dtype="bfloat16"
    )
    assert jax.tree.leaves(params16)[0].dtype == jnp.bfloat16
    out16 = np.asarray(encode(cfg16, params16, ids, mask))
    assert out16.dtype == np.float32
    # These inflated weights amplify rounding: transformers itself in bfloat16 is 4.6% off here.
    assert np.linalg.norm(out16 - ref) / np.linalg.norm(ref) < 0.04
    # remat and unrolling change nothing.
    cfg_r = cfg.replace(remat_policy="nothing_saveable", scan_unroll=0)
    np.testing.assert_allclose(np.asarray(encode(cfg_r, params, ids, mask)), np.asarray(out), atol=1e-6)


def test_relative_position_buckets_match_transformers():
    bucket = T5EncoderModel(tiny_hf_config(num_layers=1)).encoder.block[0].layer[0].SelfAttention._relative_position_bucket
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    for buckets, distance in ((32, 128), (8, 20)):
        want = bucket(rel, bidirectional=True, num_buckets=buckets, max_distance=distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(300, buckets, distance), want)


def test_round_trip_and_seq2seq_checkpoint(hf_model):
    cfg, params = t5_from_torch(hf_model.state_dict(), relative_attention_max_distance=20)
    back = t5_to_torch(cfg, params)
    fresh = T5EncoderModel(tiny_hf_config())
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in back.items()}, strict=True)
    for k, v in hf_model.state_dict().items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    # A T5ForConditionalGeneration state dict: decoder and lm_head keys are ignored.
    seq = T5ForConditionalGeneration(tiny_hf_config()).state_dict()
    seq.update({k: v for k, v in hf_model.state_dict().items()})
    assert any(k.startswith("decoder.") for k in seq)
    _, params2 = t5_from_torch(seq, relative_attention_max_distance=20)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, params2))


def test_bad_checkpoints_are_one_line_errors(hf_model):
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}

    def error(state, **kw):
        with pytest.raises(CheckpointError) as e:
            t5_from_torch(state, **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    bad = dict(sd)
    bad["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 40), np.float32)
    assert "wrong shapes: encoder.block.1.layer.1.DenseReluDense.wo.weight (32, 40) (expected (32, 48))" in error(bad)
    assert "missing keys: encoder.final_layer_norm.weight" in error({k: v for k, v in sd.items() if "final" not in k})
    assert "unexpected keys: encoder.block.0.extra.weight" in error({**sd, "encoder.block.0.extra.weight": np.zeros(3)})
    assert "only T5 v1.1" in error({**sd, "encoder.block.0.layer.1.DenseReluDense.wi.weight": np.zeros((48, 32))})
    assert "no shared.weight" in error({k: v for k, v in sd.items() if "embed" not in k and "shared" not in k})
    assert "says num_heads=8 but the weights have num_heads=4" in error(sd, num_heads=8)


def test_config_from_hf_and_presets():
    xxl = {
        "d_ff": 10240,
        "d_kv": 64,
        "d_model": 4096,
        "num_heads": 64,
        "num_layers": 24,
        "vocab_size": 32128,
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
        "layer_norm_epsilon": 1e-6,
        "num_decoder_layers": 24,
        "dropout_rate": 0.1,
        "model_type": "t5",
    }  # google/t5-v1_1-xxl's fields
    assert T5Config.from_hf_config(xxl) == T5Config.t5_v1_1_xxl()
    assert abs(T5Config.t5_v1_1_xxl().num_params - 4.762e9) < 1e7
    with pytest.raises(ConfigError, match="only T5 v1.1"):
        T5Config.from_hf_config({**xxl, "feed_forward_proj": "relu"})
    with pytest.raises(ConfigError, match="dtype"):
        T5Config(dtype="float8")


def test_xxl_shards_over_fsdp():
    """Every large XXL matrix is split 8 ways over 'fsdp' by its d_model dimension."""
    from skipdit_jax import sharding

    shapes = param_shapes(T5Config.t5_v1_1_xxl(param_dtype="bfloat16"))
    mesh = jax.sharding.AbstractMesh((1, 8), ("data", "fsdp"))
    specs = sharding.param_partition_specs(shapes, mesh, param_axes=PARAM_AXES)
    per_device = total = 0
    for spec, leaf in zip(
        jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)), jax.tree.leaves(shapes), strict=True
    ):
        n = int(np.prod(leaf.shape)) * 2
        total += n
        per_device += n // 8 if "fsdp" in tuple(spec) else n
    assert total > 9.4e9 and per_device < total / 7.9
    assert tuple(specs["blocks"]["wo"]) == (None, None, "fsdp") and tuple(specs["shared"]) == (None, "fsdp")


def test_load_folders(hf_model, tmp_path):
    # Latte layout: the encoder in text_encoder/, saved in shards with an index.
    hf_model.save_pretrained(tmp_path / "latte" / "text_encoder", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "latte" / "text_encoder").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    ids, mask = ids_and_mask(1)
    ref = torch_out(hf_model, ids, mask)
    cfg, params = load_t5(tmp_path / "latte")
    assert cfg.relative_attention_max_distance == 20  # from config.json, not the default 128
    np.testing.assert_allclose(np.asarray(encode(cfg, params, ids, mask)), ref, atol=3e-5)
    # Onto a mesh (one device here), stored in bfloat16.
    from skipdit_jax.sharding import make_mesh

    cfg16, p16 = load_t5(tmp_path / "latte" / "text_encoder", param_dtype="bfloat16", mesh=make_mesh(1, 1))
    assert p16["blocks"]["q"].dtype == jnp.bfloat16 and isinstance(p16["blocks"]["q"].sharding, jax.sharding.NamedSharding)
    # A bfloat16 safetensors file (memory-mapped through ml_dtypes) and a .bin (safe torch.load).
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cfg_b, p_b = load_t5(tmp_path / "bf16" / "model.safetensors")  # no config.json read: sizes from shapes
    np.testing.assert_array_equal(np.asarray(p_b["shared"]), hf_model.shared.weight.detach().to(torch.bfloat16).float().numpy())
    (tmp_path / "bin").mkdir()
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(tiny_hf_config().to_dict()))
    _, p_bin = load_t5(tmp_path / "bin")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p_bin, params))


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_t5(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_t5(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_hf_config().to_dict()))
    with pytest.raises(CheckpointError, match="no T5 weights"):
        load_t5(tmp_path / "empty")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_t5(tmp_path / "junk.safetensors")
    with pytest.raises(HubUnavailableError):  # the suite runs with HF_HUB_OFFLINE=1
        load_t5("hf://no-such-org/no-such-t5/text_encoder", cache_dir=str(tmp_path / "hub"))
