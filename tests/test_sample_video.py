"""Videos: MP4/GIF writing and reading back, frame folders, `indices`, the official uint8
conversion and the one-line errors; `skipdit sample` / `sample-many` on a tiny Latte."""

import numpy as np
import pytest
from PIL import Image

from skipdit_jax import videos
from skipdit_jax.errors import UserError


def _smooth_video(f=5, h=33, w=31, seed=0):
    """Moving smooth gradients (what H.264 reproduces closely), distinct per frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(f):
        a, b = rng.uniform(2, 5, 2)
        frames.append(np.stack([(xx * a + 9 * t) % 200 + 20, (yy * b + 5 * t) % 200 + 20, np.full_like(xx, 60 + 20 * t)], -1))
    return np.asarray(frames, np.uint8)


# ---- videos.py ------------------------------------------------------------------------------
def test_mp4_round_trip_odd_size_padded_indices_and_frame_count(tmp_path):
    frames = _smooth_video()
    path = tmp_path / "sub" / "v.mp4"
    videos.write_mp4(path, frames, fps=8)
    assert [p.name for p in path.parent.iterdir()] == ["v.mp4"]  # no temporary left behind
    back = videos.read_video(path)
    assert back.shape == (5, 34, 32, 3) and back.dtype == np.uint8  # odd sizes padded to even
    err = np.abs(back[:, :33, :31].astype(int) - frames.astype(int))
    assert err.mean() < 3.0, err.mean()
    # The padding replicates the last row / column.
    assert np.abs(back[:, 33].astype(int) - back[:, 32].astype(int)).mean() < 3.0
    assert videos.video_num_frames(path) == 5
    picked = videos.read_video(path, indices=[3, 0, 3])
    np.testing.assert_array_equal(picked, back[[3, 0, 3]])
    with pytest.raises(UserError, match=r"v\.mp4.*5 frames.*frame 7"):
        videos.read_video(path, indices=[1, 7])


def test_gif_round_trip_and_grayscale(tmp_path):
    frames = _smooth_video(f=4, h=16, w=12)
    videos.write_gif(tmp_path / "v.gif", frames, fps=8)
    back = videos.read_video(tmp_path / "v.gif")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4.0
    assert videos.video_num_frames(tmp_path / "v.gif") == 4
    with Image.open(tmp_path / "v.gif") as im:
        assert im.n_frames == 4 and im.info["duration"] == 10 * round(100 / 8) and im.info["loop"] == 0
    gray = frames[..., :1]
    videos.write_gif(tmp_path / "g.gif", gray)
    back = videos.read_video(tmp_path / "g.gif")
    assert back.shape == (4, 16, 12, 3)
    assert np.abs(back[..., 0].astype(int) - gray[..., 0].astype(int)).max() <= 2


def test_frame_folder_sorted_by_name_with_indices(tmp_path):
    frames = _smooth_video(f=3, h=8, w=10)
    for frame, name in zip(frames, ["c.png", "a.png", "b.png"], strict=True):
        Image.fromarray(frame).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    back = videos.read_video(tmp_path)
    np.testing.assert_array_equal(back, frames[[1, 2, 0]])
    np.testing.assert_array_equal(videos.read_video(tmp_path, indices=[2]), frames[[0]])
    assert videos.video_num_frames(tmp_path) == 3
    with pytest.raises(UserError, match="3 frames, frame 3"):
        videos.read_video(tmp_path, indices=[3])


def test_video_to_uint8_is_the_official_rounding():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0], np.float32)
    # ((x * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(uint8), written out independently
    want = np.clip((x * 0.5 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(videos.video_to_uint8(x), want)
    assert videos.video_to_uint8(np.zeros((2, 3, 4, 4, 3))).shape == (2, 3, 4, 4, 3)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.mp4"):
        videos.read_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 20)
    for fn in (videos.read_video, videos.video_num_frames):
        with pytest.raises(UserError, match="bad.mp4: cannot decode"):
            fn(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no frame images"):
        videos.read_video(tmp_path / "empty")
    with pytest.raises(UserError, match="uint8"):
        videos.write_mp4(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match=r"\(F, H, W, 3\)"):
        videos.write_mp4(tmp_path / "x.mp4", np.zeros((8, 8, 3), np.uint8))
    assert not (tmp_path / "x.mp4").exists()


# ---- sample / sample-many on a tiny Latte ------------------------------------------------------
import hashlib  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402

from skipdit_jax import model_store  # noqa: E402
from skipdit_jax.models import LatteConfig, family_of  # noqa: E402
from skipdit_jax.models.families import config_to_dict  # noqa: E402

LATTE = LatteConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=8, num_heads=4, num_frames=3, num_classes=5,
                    long_skip=True)
VAE_META = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4,
            "latent_channels": 4}


def _latte_params(config, seed=0, scale=0.05):
    params = family_of(config).init_params(seed)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    return jax.tree.unflatten(treedef, [np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """latte/: a tiny random Latte-skip (5 classes, 3 frames of 4x4x4 latents); vae/: a tiny
    random diffusers VAE (2x upsampling, 4 latent channels); uncond/ and dit/: only the
    configs of an unconditional Latte and of a DiT (their errors come before any weights)."""
    from helpers import tiny_config
    from safetensors.numpy import save_file

    from skipdit_jax.encoders.vae import VAEConfig, diffusers_key_shapes

    root = tmp_path_factory.mktemp("video_models")
    model_store.save_model(root / "latte", LATTE, _latte_params(LATTE))
    rng = np.random.default_rng(0)
    shapes = diffusers_key_shapes(VAEConfig.from_diffusers_config(VAE_META))
    (root / "vae").mkdir()
    weights = {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    save_file(weights, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "vae" / "config.json").write_text(json.dumps(VAE_META))
    for name, cfg in (("uncond", LatteConfig(**{**LATTE.to_dict(), "num_classes": 0})), ("dit", tiny_config(depth=2))):
        (root / name).mkdir()
        (root / name / model_store.CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg)))
    return root


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_decode_video_latents_in_frame_chunks_equals_one_call(models):
    from skipdit_jax.encoders.vae import decode_latents, decode_video_latents, load_vae

    cfg, params = load_vae(str(models / "vae"))
    z = jax.random.normal(jax.random.key(1), (2, 5, 4, 4, 4))
    whole = np.asarray(jax.jit(decode_latents, static_argnums=1)(params, cfg, z.reshape(10, 4, 4, 4))).reshape(2, 5, 8, 8, 3)
    chunked = np.asarray(jax.jit(decode_video_latents, static_argnums=(1, 3))(params, cfg, z, 2))  # 3 chunks, last padded
    assert chunked.shape == (2, 5, 8, 8, 3)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert np.abs(whole[:, 1] - whole[:, 0]).mean() > 1e-2  # frames differ: a mixed-up order would show


def test_sample_many_videos_resume_gives_the_same_bytes(models, tmp_path):
    from skipdit_jax.encoders.vae import load_vae
    from skipdit_jax.sampling import sample_many

    config, params = model_store.load_model(models / "latte")
    vae = load_vae(str(models / "vae"))
    run = dict(num=3, batch_size=2, seed=1, sampler="ddim", num_steps=2, cfg_scale=3.0, vae=vae, vae_spec="tiny", decode_frames=2,
               progress=False, compare=False)
    ref, out = tmp_path / "ref", tmp_path / "run"
    sample_many(config, params, ref, **run)
    with pytest.raises(RuntimeError, match="test hook"):
        sample_many(config, params, out, videos=True, _stop_after=1, **run)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000000-00000002.npz"] and not (out / "samples.npz").exists()
    summary = sample_many(config, params, out, videos=True, **run)
    assert summary["images"] == 1 and summary["videos"] and summary["videos_written"] == 3
    assert _digest(out / "samples.npz") == _digest(ref / "samples.npz")
    z = np.load(out / "samples.npz")
    assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (3, 3, 8, 8, 3)
    assert z["arr_1"].shape == (3,) and set(z["arr_1"].tolist()) <= set(range(5))
    assert np.unique(z["arr_0"]).size > 20 and np.abs(np.diff(z["arr_0"].astype(int), axis=1)).mean() > 1  # frames differ
    mp4s = sorted(p.name for p in (out / "videos").iterdir())
    assert mp4s == [f"sample_{i:06d}.mp4" for i in range(3)]
    back = videos.read_video(out / "videos" / "sample_000002.mp4")
    assert back.shape == (3, 8, 8, 3) and np.abs(back.astype(int) - z["arr_0"][2].astype(int)).mean() < 12
    settings = json.loads((out / "settings.json").read_text())
    assert settings["image_shape"] == [3, 8, 8, 3] and settings["model_family"] == "latte"


def test_sample_command_writes_mp4_gif_and_latents(models, tmp_path, capsys):
    from skipdit_jax.cli import main

    out = tmp_path / "out"
    argv = ["skipdit", "sample", str(models / "latte"), "--labels=1,4", "--sampler=ddim", "--steps=2", "--cfg_scale=4",
            f"--vae={models / 'vae'}", "--decode_frames=2", f"--out={out}"]
    assert main(argv) == 0
    assert "wrote 2 videos of 3 frames at 8 fps (decoded with the VAE)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_000.gif", "sample_000.mp4", "sample_001.gif", "sample_001.mp4", "samples.json", "samples.npy"]
    latents = np.load(out / "samples.npy")
    assert latents.shape == (2, 3, 4, 4, 4) and np.isfinite(latents).all()
    report = json.loads((out / "samples.json").read_text())
    assert report["labels"] == [1, 4] and report["guided_channels"] == 4 and report["frames"] == 3
    mp4, gif = videos.read_video(out / "sample_001.mp4"), videos.read_video(out / "sample_001.gif")
    # 8x8 frames shown 16x (nearest) for viewing.
    assert mp4.shape == gif.shape == (3, 128, 128, 3)
    assert np.abs(mp4.astype(int) - gif.astype(int)).mean() < 12


def _cli_error(capsys, *argv):
    from skipdit_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["skipdit", *map(str, argv)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("skipdit: error:"), lines
    return lines[0]


def test_video_errors_are_one_line(models, tmp_path, capsys):
    latte, uncond, dit, out = models / "latte", models / "uncond", models / "dit", tmp_path / "out"
    assert "unconditional: drop --labels" in _cli_error(capsys, "sample", uncond, "--labels=1", f"--out={out}")
    assert "--decode_frames must be >= 1" in _cli_error(capsys, "sample", latte, "--decode_frames=0", f"--out={out}")
    many = ["sample-many", "--num=2", "--batch_size=2", f"--out={out}"]
    assert "--png writes images" in _cli_error(capsys, *many, latte, "--png")
    assert "--videos writes videos" in _cli_error(capsys, *many, dit, "--videos")
    assert "--preset fid50k is for image models; this is a video model (use fvd2048)" in _cli_error(
        capsys, *many, latte, "--preset=fid50k")
    assert "--preset fvd2048 is for video models" in _cli_error(capsys, *many, dit, "--preset=fvd2048")
    assert not out.exists()
    from skipdit_jax.sampling import sample

    with pytest.raises(UserError, match=r"noise must have shape \(B, 3, 4, 4, 4\) \(NFHWC\)"):
        sample(LATTE, None, noise=np.zeros((2, 4, 4, 4), np.float32), labels=np.array([1, 2]))


def test_fvd_preset_is_the_official_c2v_setting():
    from absl import flags

    from skipdit_jax.commands import sample_many as command

    fv = flags.FlagValues()
    command.define_flags(fv)
    fv(["x", "--preset=fvd2048", "--num=16"])
    ucf = command.resolve(fv, LATTE)
    assert ucf == {"sampler": "ddpm", "steps": 250, "cfg_scale": 7.0, "cfg_channels": None, "num": 16,
                   "vae": "hf://stabilityai/sd-vae-ft-ema"}
    sky = command.resolve(fv, LatteConfig(**{**LATTE.to_dict(), "num_classes": 0}))
    assert sky == {**ucf, "cfg_scale": 1.0}
    fv2 = flags.FlagValues()
    command.define_flags(fv2)
    fv2(["x", "--preset=fvd2048", "--cfg_scale=2"])
    assert command.resolve(fv2, LATTE)["cfg_scale"] == 2.0 and command.resolve(fv2, LATTE)["num"] == 2048
