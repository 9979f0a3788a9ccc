"""Parity of skipdit_jax.encoders.vae_temporal with diffusers' AutoencoderKLTemporalDecoder, plus loading.

A tiny random-weight diffusers model keeps this fast on CPU. Every torch parameter is re-drawn,
the time mixers' mix_factor included (diffusers initialises it to 0), so a wrong layout, a
GroupNorm over the wrong axes or a swapped blend anywhere changes the output.
"""

import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from skipdit_jax.encoders.vae_temporal import (  # noqa: E402
    TemporalVAEConfig,
    decode_video_latents_temporal,
    encode_video_to_latents,
    load_temporal_vae,
    temporal_vae_key_shapes,
    temporal_vae_params_from_diffusers,
    temporal_vae_params_to_diffusers,
)
from skipdit_jax.errors import CheckpointError, ConfigError, HubUnavailableError  # noqa: E402

TINY = dict(block_out_channels=(32, 64), layers_per_block=2, latent_channels=4, scaling_factor=0.5)
h, w = 4, 6  # latent side, non-square so a swapped H/W would show


def _torch_model(seed=0, **overrides):
    kw = dict(TINY, **overrides)
    model = diffusers.AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * len(kw["block_out_channels"]), **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("mix_factor"):
                p.copy_(1.5 * noise)  # sigmoid far from 0.5, different per block
            elif p.ndim == 1 and name.endswith("weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny():
    model = _torch_model()
    config = TemporalVAEConfig(**TINY)
    return model, config, temporal_vae_params_from_diffusers(_state(model), config)


def _torch_decode_like_pipeline(model, latents_bfhwc, chunk, scaling_factor):
    """Latte's decode_latents_with_temporal_decoder on (B, F, h, w, C) latents, returned channels-last."""
    b, f = latents_bfhwc.shape[:2]
    z = torch.from_numpy(np.asarray(latents_bfhwc)).permute(0, 1, 4, 2, 3).reshape(b * f, -1, h, w)
    z = 1 / scaling_factor * z
    with torch.no_grad():
        out = [model.decode(z[i : i + chunk], num_frames=z[i : i + chunk].shape[0]).sample for i in range(0, b * f, chunk)]
    video = torch.cat(out).reshape(b, f, *out[0].shape[1:]).permute(0, 1, 3, 4, 2)
    return video.numpy()


def _assert_close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol * max(1.0, float(np.abs(ref).max())))


def test_decode_one_chunk_matches_diffusers(tiny):
    model, config, params = tiny
    # Two videos of 2 frames (< 14): one call with num_frames=2; the temporal GroupNorms must keep
    # per-video statistics.
    latents = np.random.default_rng(0).normal(size=(2, 2, h, w, 4)).astype(np.float32)
    ours = decode_video_latents_temporal(params, config, latents)
    assert ours.shape == (2, 2, 2 * h, 2 * w, 3)
    _assert_close(ours, _torch_decode_like_pipeline(model, latents, 2, config.scaling_factor))


def test_chunked_decode_matches_the_pipeline_loop(tiny):
    model, config, params = tiny
    rng = np.random.default_rng(1)
    latents = rng.normal(size=(1, 3, h, w, 4)).astype(np.float32)  # chunks of 2 and 1
    ours = decode_video_latents_temporal(params, config, latents, chunk_frames=2)
    _assert_close(ours, _torch_decode_like_pipeline(model, latents, 2, config.scaling_factor))
    # Two videos of 3 frames: the pipeline chunks the flattened (B*F) axis, so the second chunk holds the
    # last frame of video 0 and the first of video 1; flatten_batch=True reproduces that exactly.
    two = rng.normal(size=(2, 3, h, w, 4)).astype(np.float32)
    ours = decode_video_latents_temporal(params, config, two, chunk_frames=2, flatten_batch=True)
    _assert_close(ours, _torch_decode_like_pipeline(model, two, 2, config.scaling_factor))
    with pytest.raises(ValueError, match="video latents must be"):
        decode_video_latents_temporal(params, config, latents[0])


def test_encode_matches_diffusers(tiny):
    model, config, params = tiny
    video = np.random.default_rng(2).uniform(-1, 1, size=(1, 2, 2 * h, 2 * w, 3)).astype(np.float32)
    ours = encode_video_to_latents(params, config, video)
    with torch.no_grad():
        x = torch.from_numpy(video).reshape(2, 2 * h, 2 * w, 3).permute(0, 3, 1, 2)
        ref = model.encode(x).latent_dist.mean.permute(0, 2, 3, 1).numpy() * config.scaling_factor
    _assert_close(ours, ref.reshape(1, 2, h, w, 4))
    noisy = encode_video_to_latents(params, config, video, rng=jax.random.key(0))
    assert noisy.shape == ours.shape and not np.allclose(noisy, ours)


def test_converter_round_trip_and_bad_keys(tiny):
    model, config, params = tiny
    state = _state(model)
    back = temporal_vae_params_to_diffusers(params)
    assert set(back) == set(state) == set(temporal_vae_key_shapes(config))
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    _torch_model(seed=1).load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=True)

    bad = dict(state)
    del bad["decoder.time_conv_out.weight"]
    bad["decoder.bogus.weight"] = np.zeros(3, np.float32)
    bad["decoder.mid_block.resnets.0.time_mixer.mix_factor"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError) as e:
        temporal_vae_params_from_diffusers(bad, config)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("missing keys: decoder.time_conv_out.weight", "unexpected keys: decoder.bogus.weight", "mix_factor: got (2,)"):
        assert part in msg
    plain = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2
    )
    with pytest.raises(CheckpointError, match="plain AutoencoderKL"):
        temporal_vae_params_from_diffusers(_state(plain), config)


def test_load_from_saved_folder_and_bad_specs(tiny, tmp_path):
    model, config, params = tiny
    folder = tmp_path / "pipeline" / "vae_temporal_decoder"
    model.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    for spec in (folder, tmp_path / "pipeline"):  # the VAE folder, or the pipeline folder holding it
        loaded_config, loaded = load_temporal_vae(spec)
        assert loaded_config == config
        jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert load_temporal_vae(folder, dtype="bfloat16")[0].dtype == "bfloat16"

    with pytest.raises(ConfigError, match="bad Hub spec"):
        load_temporal_vae("hf://maxin-cn")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_temporal_vae(tmp_path / "nowhere")
    with pytest.raises(HubUnavailableError):  # HF_HUB_OFFLINE=1 in the tests; never cached
        load_temporal_vae("hf://skipdit-tests/not-a-repo/vae_temporal_decoder", cache_dir=str(tmp_path / "hub"))
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ConfigError, match="load_vae"):
        load_temporal_vae(folder)
    with pytest.raises(ConfigError, match="multiple of"):
        TemporalVAEConfig(block_out_channels=(48,))
