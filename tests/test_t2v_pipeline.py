"""Text-to-video sampling: `skipdit sample --prompt` and `skipdit sample-vbench` end to end on a
tiny random Latte-T2V-skip, a tiny random T5 + SentencePiece tokenizer and tiny random VAEs."""

import json
import random

import numpy as np
import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")  # the tokenizer

import jax  # noqa: E402

from skipdit_jax import model_store, videos  # noqa: E402
from skipdit_jax.models.families import config_to_dict, family_of  # noqa: E402

WORDS = "a red blue green cat dog bird runs jumps flies over under the city forest river at night in morning slowly".split()
VAE_META = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
}
TVAE_META = {
    "_class_name": "AutoencoderKLTemporalDecoder",
    "block_out_channels": [32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"],
}


def _noisy(params, seed, scale=0.05):
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32) for a in leaves])


def _random_params(abstract, seed):
    """Random non-zero parameters of the given shapes (norm scales around 1), without compiling the init."""
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [
        (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
        for path, a in flat[0]
    ]
    return jax.tree.unflatten(flat[1], leaves)


def _tokenizer(folder):
    import sentencepiece as spm

    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(300)]
    (folder.parent / "captions.txt").write_text("\n".join(captions))
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(folder.parent / "captions.txt"),
        model_prefix=str(folder / "spiece"),
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "spiece.vocab").unlink()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """model/: a tiny random Latte-T2V-skip (caption width 16); latte/: a Latte-1-like folder with
    text_encoder/ (T5, d_model 16), tokenizer/, vae/; latte_t/: the same with vae_temporal_decoder/;
    dit/: only a class model's config."""
    from safetensors.numpy import save_file

    from skipdit_jax.encoders.t5 import T5Config, init_params
    from skipdit_jax.encoders.t5_io import t5_to_torch
    from skipdit_jax.encoders.vae import VAEConfig, diffusers_key_shapes
    from skipdit_jax.encoders.vae_temporal import TemporalVAEConfig, temporal_vae_key_shapes
    from skipdit_jax.models.latte import LatteConfig
    from skipdit_jax.models.latte_t2v import LatteT2VConfig

    r = tmp_path_factory.mktemp("t2v")
    config = LatteT2VConfig(
        input_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=4,
        num_heads=2,
        num_frames=3,
        caption_channels=16,
        text_len=8,
        long_skip=True,
    )
    model_store.save_model(r / "model", config, _random_params(family_of(config).abstract_params(), 1))
    latte = r / "latte"
    latte.mkdir()
    _tokenizer(latte / "tokenizer")
    t5_cfg = T5Config(
        vocab_size=160,
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    t5 = latte / "text_encoder"
    t5.mkdir()
    state = t5_to_torch(t5_cfg, _noisy(init_params(t5_cfg, jax.random.key(0)), 2, 0.2))
    save_file({k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}, str(t5 / "model.safetensors"))
    (t5 / "config.json").write_text(json.dumps(t5_cfg.hf_config()))
    rng = np.random.default_rng(0)
    (latte / "vae").mkdir()
    shapes = diffusers_key_shapes(VAEConfig.from_diffusers_config(VAE_META))
    save_file(
        {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()},
        str(latte / "vae" / "diffusion_pytorch_model.safetensors"),
    )
    (latte / "vae" / "config.json").write_text(json.dumps(VAE_META))
    tv = r / "latte_t" / "vae_temporal_decoder"
    tv.mkdir(parents=True)
    shapes = temporal_vae_key_shapes(TemporalVAEConfig.from_diffusers_config(TVAE_META))
    save_file(
        {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()},
        str(tv / "diffusion_pytorch_model.safetensors"),
    )
    (tv / "config.json").write_text(json.dumps(TVAE_META))
    (r / "dit").mkdir()
    dit = LatteConfig(
        input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_frames=3, num_classes=5
    )
    (r / "dit" / model_store.CONFIG_FILE).write_text(json.dumps(config_to_dict(dit)))
    return r


def _sample(root, out, *extra, prompts=("--prompt=a red cat runs|a blue dog",)):
    from skipdit_jax.cli import main

    argv = [
        "skipdit",
        "sample",
        str(root / "model"),
        f"--pipeline={root / 'latte'}",
        *prompts,
        "--steps=3",
        "--seed=1",
        "--decode_frames=3",
        f"--out={out}",
        *extra,
    ]
    assert main(argv) == 0


def test_sample_prompt_end_to_end_deterministic_and_cached(root, tmp_path, capsys):
    from skipdit_jax.cli import main

    _sample(root, tmp_path / "a")
    (tmp_path / "prompts.txt").write_text("a red cat runs\n\na blue dog\n")
    _sample(root, tmp_path / "b", prompts=[f"--prompts={tmp_path / 'prompts.txt'}"])
    # The cached run reads the embeddings that skipdit encode-text wrote (the prompts and the negative "").
    emb = tmp_path / "emb.safetensors"
    latte = root / "latte"
    assert (
        main(
            [
                "skipdit",
                "encode-text",
                f"--t5={latte / 'text_encoder'}",
                f"--tokenizer={latte / 'tokenizer'}",
                f"--prompts={tmp_path / 'prompts.txt'}",
                f"--out={emb}",
            ]
        )
        == 0
    )
    capsys.readouterr()
    _sample(root, tmp_path / "c", "--cache=N2-700-50", f"--embeddings={emb}", prompts=())
    printed = capsys.readouterr().out
    a, b, c = (np.load(tmp_path / d / "samples.npy") for d in "abc")
    assert a.shape == (2, 3, 4, 4, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # the seed fixes everything
    assert not np.allclose(a[0], a[1])  # per-prompt noise and text differ
    # DDIM-3 (666, 333, 0): step 333 is cached; the result moves a little, not a lot.
    rel = np.abs(c - a).mean() / np.abs(a).mean()
    assert 1e-6 < rel < 0.5, rel
    assert "predicted speedup" in printed and "measured" in printed
    report = json.loads((tmp_path / "c" / "samples.json").read_text())
    assert report["prompts"] == ["a red cat runs", "a blue dog"] and report["seeds"] == [1, 2]
    assert report["cached_steps"] >= 1 and report["predicted_speedup"] > 1 and "measured_speedup" in report
    assert report["steps"] == 3 and report["cfg_scale"] == 7.5 and report["scheduler"]["clip_sample"] is False
    mp4, gif = videos.read_video(tmp_path / "a" / "sample_001.mp4"), videos.read_video(tmp_path / "a" / "sample_001.gif")
    assert mp4.shape == gif.shape == (3, 128, 128, 3)  # 8x8 decoded frames shown 16x


def test_pipeline_pieces():
    from skipdit_jax.pipelines import frames_to_uint8, load_scheduler, make_noise

    x = np.array([-2.0, -1.0, -0.3, 0.0, 0.999, 1.0, 3.0], np.float32)
    want = (np.clip(x / 2 + 0.5, 0, 1) * 255).astype(np.uint8)  # LattePipeline's rounding (truncation)
    np.testing.assert_array_equal(frames_to_uint8(x), want)
    s = load_scheduler(None)
    assert s.timesteps(50)[:3].tolist() == [980, 960, 940] and s.timesteps(50)[-1] == 0 and not s.clip_sample
    k1, n1 = make_noise([3, 4], (2, 2))
    _, n2 = make_noise([4], (2, 2))
    np.testing.assert_array_equal(np.asarray(n1[1]), np.asarray(n2[0]))  # a video's noise depends on its seed only


def _vbench(root, out, pi=0, pc=1, *extra):
    from absl import flags

    from skipdit_jax.commands import sample_vbench

    fv = flags.FlagValues()
    sample_vbench.define_flags(fv)
    fv(
        [
            "x",
            f"--prompt_dir={root / 'prompts'}",
            f"--out={out}",
            "--seeds=2",
            "--seed=7",
            "--steps=2",
            f"--pipeline={root / 'latte_t'}",
            f"--tokenizer={root / 'latte' / 'tokenizer'}",
            f"--t5={root / 'latte' / 'text_encoder'}",
            "--batch_size=3",
            *extra,
        ]
    )
    return sample_vbench.main([str(root / "model")], fv, process_index=pi, process_count=pc)


def test_sample_vbench_names_shards_and_resume(root, tmp_path, capsys):
    prompts = root / "prompts"
    prompts.mkdir(exist_ok=True)
    (prompts / "subject_consistency.txt").write_text("a cat runs\na dog jumps over the river\n")
    (prompts / "scene.txt").write_text("a forest at night\n\nthe city\n")
    out0, out1 = tmp_path / "p0", tmp_path / "p1"
    assert _vbench(root, out0, 0, 2) == 0 and _vbench(root, out1, 1, 2) == 0
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    a, b = files(out0), files(out1)
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(
        f"{d}/{p}-{i}.mp4"
        for d, ps in (
            ("scene", ["a forest at night", "the city"]),
            ("subject_consistency", ["a cat runs", "a dog jumps over the river"]),
        )
        for p in ps
        for i in (0, 1)
    )
    assert a == [
        "scene/a forest at night-0.mp4",
        "scene/a forest at night-1.mp4",
        "subject_consistency/a cat runs-0.mp4",
        "subject_consistency/a cat runs-1.mp4",
    ]
    clip = videos.read_video(out0 / a[0])
    assert clip.shape == (3, 4, 4, 3)  # one decoder block: no upsampling
    mtimes = {p: (out0 / p).stat().st_mtime_ns for p in a}
    (out0 / a[1]).unlink()
    capsys.readouterr()
    assert _vbench(root, out0, 0, 2) == 0
    assert "1 to sample" in capsys.readouterr().out
    assert {p: (out0 / p).stat().st_mtime_ns for p in a if p != a[1]} == {p: t for p, t in mtimes.items() if p != a[1]}
    np.testing.assert_array_equal(videos.read_video(out0 / a[1]).shape, clip.shape)
    assert _vbench(root, out0, 0, 2) == 0 and "0 to sample" in capsys.readouterr().out


def _cli_error(capsys, *argv):
    from skipdit_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["skipdit", *map(str, argv)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("skipdit: error:"), lines
    return lines[0]


def test_bad_inputs_are_one_line(root, tmp_path, capsys):
    model, latte, out = root / "model", root / "latte", tmp_path / "out"
    base = ["sample", model, f"--pipeline={latte}", f"--out={out}", "--steps=2"]
    assert "needs prompts" in _cli_error(capsys, *base)
    assert "--prompt is for text-to-video models" in _cli_error(capsys, "sample", root / "dit", "--prompt=a cat", f"--out={out}")
    (tmp_path / "tok").mkdir()
    assert "no T5 tokenizer" in _cli_error(capsys, *base, "--prompt=a cat", f"--tokenizer={tmp_path / 'tok'}")
    wide = tmp_path / "t5wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({"d_model": 24, "num_layers": 1}))
    assert "width 24" in _cli_error(capsys, *base, "--prompt=a cat", f"--t5={wide}")
    assert "bad cache spec" in _cli_error(capsys, *base, "--prompt=a cat", "--cache=N2-700")
    assert "not --labels" in _cli_error(capsys, *base, "--prompt=a cat", "--labels=1")
    assert "--num is for class-conditional models" in _cli_error(capsys, *base, "--prompt=a cat", "--num=3")
    bad = tmp_path / "prompts"
    bad.mkdir()
    (bad / "scene.txt").write_text("a cat\nup/down\n")
    line = _cli_error(capsys, "sample-vbench", model, f"--prompt_dir={bad}", f"--out={out}")
    assert "scene.txt:2" in line and "'/'" in line
    assert not out.exists()


def test_generate_videos_is_the_latte_pipeline_loop(root, tmp_path):
    """generate_videos against LattePipeline's loop written from its code: diffusers' DDIMScheduler
    from the folder's scheduler config with the official overrides, batch [uncond; text], guidance
    on all 8 channels, then the first 4."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    from skipdit_jax.pipelines import generate_videos, load_scheduler, make_noise

    (tmp_path / "scheduler").mkdir()
    latte1_like = {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.0002,
        "beta_end": 0.03,
        "beta_schedule": "scaled_linear",
        "clip_sample": True,
        "set_alpha_to_one": False,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "variance_type": "learned_range",
    }
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(latte1_like))
    sched = load_scheduler(tmp_path)
    assert sched.timesteps(4).tolist() == [999, 749, 499, 249]  # the file's spacing; the overrides' betas
    config, params = model_store.load_model(root / "model")
    family = family_of(config)
    rng = np.random.default_rng(3)
    text, null = rng.standard_normal((2, 2, 6, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32)
    cond = {"text_emb": text, "text_mask": mask, "null_emb": null, "null_mask": mask.copy()}
    latents, clips = generate_videos(config, params, cond, [5, 9], scheduler=sched, num_steps=4, cfg_scale=5.0)
    assert latents.shape == (2, 3, 4, 4, 4) and clips.dtype == np.uint8

    ref = diffusers.DDIMScheduler.from_pretrained(
        tmp_path, subfolder="scheduler", beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False
    )
    ref.set_timesteps(4)
    apply = jax.jit(family.apply)
    both = {"text_emb": np.concatenate([null, text]), "text_mask": np.concatenate([mask, mask])}
    x = torch.from_numpy(np.array(make_noise([5, 9], family.sample_shape)[1]))
    for t in ref.timesteps:
        out = np.asarray(apply(params, np.concatenate([x.numpy()] * 2), np.full((4,), int(t), np.int32), both))
        uncond, cond_out = np.split(out, 2)
        eps = (uncond + 5.0 * (cond_out - uncond))[..., :4]
        x = ref.step(torch.from_numpy(eps), t, x).prev_sample
    np.testing.assert_allclose(latents, x.numpy(), rtol=1e-4, atol=1e-4)
