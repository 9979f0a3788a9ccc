"""Parity of skipdit_jax.vae with diffusers' PyTorch AutoencoderKL, plus weight loading.

A small random-weight diffusers VAE keeps this fast on CPU. Every torch parameter is
re-drawn (GroupNorm affines included), so a wrong layout mapping anywhere changes the output.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fake_gcs import fake_gcs  # noqa: E402, F401  (the fixture)
from skipdit_jax.errors import CheckpointError  # noqa: E402
from skipdit_jax.encoders.vae import (  # noqa: E402
    AutoencoderKL,
    VAEConfig,
    decode_latents,
    diffusers_key_shapes,
    encode_to_latents,
    load_vae,
    vae_params_from_diffusers,
)

SMALL = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
)
H, W = 16, 24  # non-square, so a swapped H/W anywhere would show


def _torch_vae(**overrides):
    kw = dict(SMALL, **overrides)
    n = len(kw["block_out_channels"])
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **kw
    )


def _randomise(model, seed=0):
    """Re-draws every parameter: norm scales 1 + 0.2 N(0,1), biases 0.1 N(0,1), weights
    N(0,1)/sqrt(fan_in) (keeps activations O(1), so the attention softmax is not saturated)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def _numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _assert_close(ours, ref, rtol=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def torch_vae():
    torch.manual_seed(0)
    return _randomise(_torch_vae())


@pytest.fixture(scope="module")
def config():
    return VAEConfig(**SMALL)


@pytest.fixture(scope="module")
def params(torch_vae, config):
    return vae_params_from_diffusers(_numpy_state(torch_vae), config)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, H, W, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def jitted(config):
    model = AutoencoderKL(config)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
    return encode, decode


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_sd_preset_matches_diffusers_layout():
    # A meta-device model gives diffusers' exact keys and shapes without allocating 84M params.
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
        )
    assert diffusers_key_shapes(VAEConfig.sd_vae()) == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert VAEConfig.sd_vae().scaling_factor == 0.18215
    assert VAEConfig.from_diffusers_config(dict(ref.config)) == VAEConfig.sd_vae()


def test_encode_matches_diffusers(torch_vae, params, images, jitted):
    with torch.no_grad():
        posterior = torch_vae.encode(_nchw(images)).latent_dist
    mean, logvar = jitted[0](params, images)
    assert mean.dtype == jnp.float32 and mean.shape == (2, H // 2, W // 2, 4)
    _assert_close(mean, _nhwc(posterior.mean))
    _assert_close(logvar, _nhwc(posterior.logvar))


def test_decode_matches_diffusers(torch_vae, params, jitted):
    z = np.random.default_rng(1).standard_normal((2, H // 2, W // 2, 4)).astype(np.float32)
    with torch.no_grad():
        ref = torch_vae.decode(_nchw(z)).sample
    out = jitted[1](params, z)
    assert out.shape == (2, H, W, 3)
    _assert_close(out, _nhwc(ref))


def test_bfloat16_compute_is_close(params, config, images, jitted):
    mean32, _ = jitted[0](params, images)
    model16 = AutoencoderKL(config.replace(dtype="bfloat16"))
    mean16, _ = jax.jit(lambda p, x: model16.apply({"params": p}, x, method=AutoencoderKL.encode))(params, images)
    assert mean16.dtype == jnp.float32  # outputs are float32 whatever the compute dtype
    np.testing.assert_allclose(mean16, mean32, atol=0.1 * float(np.abs(mean32).max()))


def test_old_attention_names_convert_identically(torch_vae, config, params):
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in _numpy_state(torch_vae).items():
        for new, old in old_names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]  # very old files stored them as 1x1 convs
        state[key] = value
    assert any(".query.weight" in k for k in state) and any(".proj_attn.bias" in k for k in state)
    converted = vae_params_from_diffusers(state, config)
    jax.tree.map(np.testing.assert_array_equal, converted, params)


def test_missing_key_is_named(torch_vae, config):
    state = _numpy_state(torch_vae)
    del state["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    with pytest.raises(ValueError, match=r"missing keys: decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut\.weight"):
        vae_params_from_diffusers(state, config)


def test_wrong_shape_and_unexpected_keys_are_named(torch_vae, config):
    state = _numpy_state(torch_vae)
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"][:, :, :2]
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as info:
        vae_params_from_diffusers(state, config)
    msg = str(info.value)
    assert "encoder.conv_in.weight: got (32, 3, 2, 3), expected (32, 3, 3, 3)" in msg
    assert "unexpected keys: encoder.extra.weight" in msg
    assert isinstance(info.value, CheckpointError)


def test_load_vae_from_save_pretrained(tmp_path, torch_vae, params, images):
    torch_vae.save_pretrained(tmp_path / "st")  # safetensors
    torch_vae.save_pretrained(tmp_path / "bin", safe_serialization=False)  # torch pickle
    for directory in (tmp_path / "st", tmp_path / "bin"):
        config, loaded = load_vae(directory)
        assert config == VAEConfig(**SMALL)
        jax.tree.map(np.testing.assert_array_equal, loaded, params)

    # A single weight file picks up the config.json beside it ...
    config, loaded = load_vae(tmp_path / "st" / "diffusion_pytorch_model.safetensors")
    assert config == VAEConfig(**SMALL)
    # ... and without one falls back to the SD preset, which these small weights do not fit.
    lonely = tmp_path / "lonely" / "vae.safetensors"
    lonely.parent.mkdir()
    shutil.copy(tmp_path / "st" / "diffusion_pytorch_model.safetensors", lonely)
    with pytest.raises(ValueError, match="missing keys"):
        load_vae(lonely)


def test_load_vae_from_gcs(fake_gcs, torch_vae, params):
    torch_vae.save_pretrained(fake_gcs / "bucket" / "sd" / "vae")  # a pipeline folder's vae/
    config, loaded = load_vae("gs://bucket/sd")
    assert config == VAEConfig(**SMALL)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    config, loaded = load_vae("gs://bucket/sd/vae/diffusion_pytorch_model.safetensors")
    assert config == VAEConfig(**SMALL)
    with pytest.raises(CheckpointError, match="gs://bucket/nope does not exist"):
        load_vae("gs://bucket/nope")


def test_load_vae_bad_files(tmp_path, torch_vae):
    from skipdit_jax.errors import ConfigError

    torch_vae.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:500])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is not a readable safetensors file"):
        load_vae(tmp_path / "vae")
    weights.write_bytes(good)
    (tmp_path / "vae" / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="does not hold a JSON object"):
        load_vae(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_vae(tmp_path / "vae")
    (tmp_path / "text.bin").write_text("not weights")
    with pytest.raises(CheckpointError, match="text.bin is not a PyTorch checkpoint"):
        load_vae(tmp_path / "text.bin")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unsupported VAE weight file"):
        load_vae(tmp_path / "weights.txt")


def test_load_vae_hub_unreachable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not reach the Hugging Face Hub.*local path"):
        load_vae("hf://stabilityai/sd-vae-ft-mse", cache_dir=str(tmp_path))


def test_latent_helpers_apply_scaling(params, config, images, jitted):
    encode = jax.jit(encode_to_latents, static_argnums=1)
    decode = jax.jit(decode_latents, static_argnums=1)
    mean, logvar = jitted[0](params, images)

    latents = encode(params, config, images)
    np.testing.assert_allclose(latents, mean * 0.18215, rtol=1e-6, atol=1e-7)
    _assert_close(decode(params, config, latents), jitted[1](params, mean), rtol=1e-5)

    sampled = encode(params, config, images, jax.random.key(0))
    eps = (sampled / 0.18215 - mean) / jnp.exp(0.5 * logvar)
    assert not np.allclose(sampled, latents)
    assert abs(float(eps.mean())) < 0.2 and abs(float(eps.std()) - 1.0) < 0.2
