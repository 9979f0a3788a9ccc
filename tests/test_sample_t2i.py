"""Hunyuan-DiT text-to-image sampling (skipdit_jax.pipelines.text_to_image, `skipdit sample`
on a Hunyuan-DiT): the jitted sampler against a loop around diffusers' DDPMScheduler
(v-prediction, Hunyuan's settings) with [uncond; text] guidance on diffusers'
HunyuanDiT2DModel, plain and with Skip-Cache (a loop written from the official
HunYuanDiT_cache counter), the folder layouts, the resolution list and the CLI.
Tiny model: 6 blocks of width 64, 8x8x4 latents, random non-zero weights, DDPM-10."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from skipdit_jax.errors import UserError
from skipdit_jax.pipelines import text_to_image as t2i

STEPS, SCALE = 10, 6.0
SEEDS = [3, 11]
LATENT = (8, 6, 4)  # 64x48 images
HUNYUAN_DDPM = dict(
    beta_start=0.00085,
    beta_end=0.02,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    steps_offset=1,
    clip_sample=False,
)


def _tiny_diffusers(text_len=5, text_len_t5=7, clip_dim=32, t5_dim=48, seed=0):
    from test_hunyuan import tiny_diffusers

    return tiny_diffusers(
        text_len=text_len, text_len_t5=text_len_t5, clip_dim=clip_dim, t5_dim=t5_dim, seed=seed, weight_scale=0.08
    )


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny PyTorch references run ~30x faster on one thread of a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(folders):
    """The CLI folders' transformer (64x48 images: 8x6 latents, a non-square RoPE grid) and
    a random condition for two images; its programs are the ones the CLI tests run."""
    ref = folders[2]
    config, params = t2i.load_transformer(folders[0], 64, 48)
    rng = np.random.default_rng(7)
    b = len(SEEDS)
    masks = lambda n, lens: np.array([[1] * m + [0] * (n - m) for m in lens])  # noqa: E731
    cond = {
        "clip_emb": rng.standard_normal((b, 77, 32)),
        "t5_emb": rng.standard_normal((b, 256, 24)),
        "clip_mask": masks(77, [3, 77]),
        "t5_mask": masks(256, [2, 30]),
    }
    cond |= {
        "null_clip_emb": rng.standard_normal((b, 77, 32)),
        "null_t5_emb": rng.standard_normal((b, 256, 24)),
        "null_clip_mask": masks(77, [2, 2]),
        "null_t5_mask": masks(256, [3, 3]),
    }
    cond = {k: v.astype(np.int32 if k.endswith("mask") else np.float32) for k, v in cond.items()}
    return ref, config, params, cond


def _rope(grid):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    return get_2d_rotary_pos_embed(32, get_resize_crop_region_for_grid(grid, 512 // 8 // 2), grid)


def _cached_forward(ref, x, t, clip, clip_mask, t5, t5_mask, rope, state, n, k):
    """HunYuanDiT_cache.forward (models_cache.py) on diffusers' modules: full when
    cont % n == 0 or t >= 700 (storing the input of block D-k), else blocks 0..k-1 and
    D-k..D-1 from the stored input; the counter advances per call and resets after t <= 50."""
    d = len(ref.blocks)
    hs = ref.pos_embed(x)
    temb = ref.time_extra_emb(t, t5, None, None, hidden_dtype=torch.float32)
    ctx = torch.cat([clip, ref.text_embedder(t5)], dim=1)
    keep = torch.cat([clip_mask, t5_mask], dim=-1).unsqueeze(2).bool()
    ctx = torch.where(keep, ctx, ref.text_embedding_padding)
    kw = dict(temb=temb, encoder_hidden_states=ctx, image_rotary_emb=rope)
    cur = int(t[0])
    full = state["cont"] % n == 0 or cur >= 700
    skips = []
    for layer, block in enumerate(ref.blocks):
        if not full and k <= layer < d - k:
            continue
        if layer == d - k:
            if full:
                state["val"] = hs
            else:
                hs = state["val"]
        hs = block(hs, skip=skips.pop(), **kw) if layer > d // 2 else block(hs, **kw)
        if layer < d // 2 - 1:
            skips.append(hs)
    state["cont"] += 1
    state["full"].append(full)
    if cur <= 50:
        state["cont"], state["val"] = 0, None
    hs = ref.proj_out(ref.norm_out(hs, temb))
    b, h, w = x.shape[0], x.shape[2] // 2, x.shape[3] // 2
    hs = hs.reshape(b, h, w, 2, 2, -1)
    return torch.einsum("nhwpqc->nchpwq", hs).reshape(b, -1, h * 2, w * 2)


def _step_noise(seeds, shape, steps):
    """The sampler's step noise: sample b at scan index i (counting down) is
    normal(fold_in(key(seed_b), i))."""
    keys = jax.vmap(jax.random.key)(np.asarray(seeds, np.uint32))
    return [
        np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, i), shape)) for k in keys]) for i in range(steps - 1, -1, -1)
    ]


def _reference_latents(ref, cond, seeds, steps, scale, monkeypatch, cache=None):
    """The official pipeline's loop (hydit/diffusion/pipeline.py) on diffusers' pieces:
    [uncond; text] batch, learned-sigma half dropped, guidance, DDPMScheduler.step."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    from diffusers import DDPMScheduler

    _, noise = t2i.make_noise(seeds, LATENT)
    step_noise = _step_noise(seeds, LATENT, steps)
    sched = DDPMScheduler(**HUNYUAN_DDPM)
    sched.set_timesteps(steps)
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    nchw = lambda a: tt(np.asarray(a).transpose(0, 3, 1, 2))  # noqa: E731
    pair = {k: torch.cat([tt(cond[f"null_{k}"]), tt(cond[k])]) for k in ("clip_emb", "clip_mask", "t5_emb", "t5_mask")}
    rope = _rope((LATENT[0] // 2, LATENT[1] // 2))
    lat = nchw(noise)
    state = {"cont": 0, "val": None, "full": []}
    current = {}
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda shape, **kw: current["z"])
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            inp = torch.cat([lat, lat])
            t_exp = torch.full((inp.shape[0],), float(t), dtype=torch.float32)
            args = (inp, t_exp, pair["clip_emb"], pair["clip_mask"], pair["t5_emb"], pair["t5_mask"])
            if cache is None:
                out = ref(
                    *args[:2],
                    encoder_hidden_states=args[2],
                    text_embedding_mask=args[3],
                    encoder_hidden_states_t5=args[4],
                    text_embedding_mask_t5=args[5],
                    image_rotary_emb=rope,
                    return_dict=False,
                )[0]
            else:
                out = _cached_forward(ref, *args, rope, state, *cache)
            out = out.chunk(2, dim=1)[0]
            uncond, text = out.chunk(2)
            guided = uncond + scale * (text - uncond)
            current["z"] = nchw(step_noise[i])
            lat = sched.step(guided, t, lat).prev_sample
    return lat.numpy().transpose(0, 2, 3, 1), state["full"]


def test_sampler_matches_the_diffusers_ddpm_loop(model, monkeypatch):
    ref, config, params, cond = model
    want, _ = _reference_latents(ref, cond, SEEDS, STEPS, SCALE, monkeypatch)
    got = t2i.sample_latents(config, params, cond, SEEDS, num_steps=STEPS, cfg_scale=SCALE, compiled=True)
    assert got.shape == (2, *LATENT)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=2e-3)
    assert float(np.abs(want).mean()) > 0.1


@pytest.mark.parametrize("n,k", [(2, 1)])
def test_skip_cache_matches_the_official_cached_loop(model, monkeypatch, n, k):
    ref, config, params, cond = model
    cache = t2i.hunyuan_skip_cache(n, k)
    assert cache == t2i.parse_t2i_cache(str(n), k) == t2i.parse_t2i_cache(f"{n},{k}")
    want, full = _reference_latents(ref, cond, SEEDS, STEPS, SCALE, monkeypatch, cache=(n, k))
    np.testing.assert_array_equal(cache.full_steps(t2i.load_scheduler().timesteps(STEPS)), full)
    assert 0 < sum(not f for f in full) < STEPS - 3
    got = t2i.sample_latents(config, params, cond, SEEDS, num_steps=STEPS, cfg_scale=SCALE, cache=cache, compiled=True)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3, rtol=2e-3)
    plain, _ = _reference_latents(ref, cond, SEEDS, STEPS, SCALE, monkeypatch)
    assert float(np.abs(np.asarray(got) - plain).max()) > 1e-2  # the cache did change the result


def test_settings_resolutions_and_schedule():
    assert len(t2i.RESOLUTIONS) == 10 and (1024, 1024) in t2i.RESOLUTIONS and (768, 1280) in t2i.RESOLUTIONS
    assert t2i.check_resolution(768, 1280) == (768, 1280)
    assert t2i.latent_size(768, 1280) == {"input_size": 96, "input_width": 160}
    assert t2i.latent_size(1024, 1024) == {"input_size": 128, "input_width": 0}
    with pytest.raises(UserError, match=r"unsupported resolution 1000x1000 .* 1024x1024, 1280x1280"):
        t2i.check_resolution(1000, 1000)
    sched = t2i.load_scheduler()
    ts = sched.timesteps(100)
    assert ts[0] == 991 and ts[-1] == 1 and sched.prediction_type == "v_prediction"
    plans = {n: t2i.hunyuan_skip_cache(n).plan(ts, 40) for n in (2, 3, 4)}
    assert [(p.num_full, p.num_cached) for p in plans.values()] == [(67, 33), (56, 44), (50, 50)]
    assert t2i.parse_t2i_cache(None) is None and t2i.parse_t2i_cache("off") is None
    assert t2i.parse_t2i_cache("N3-700-50", 2) == t2i.hunyuan_skip_cache(3, 2)
    assert t2i.parse_t2i_cache("3,2,800,40").start_t == 800
    u8 = t2i.images_to_uint8(np.array([-1.0, -0.999, 0.0, 0.999, 2.0]))
    np.testing.assert_array_equal(u8, [0, 0, 128, 255, 255])  # diffusers' round(), not truncation


# ---- the CLI on tiny HunyuanDiT-v1.2 folders ---------------------------------------------------
WORDS = "a red blue cat dog bird runs over the city river at night".split()
HANZI = list("一个宇航员在骑马的猫狗红色城市夜晚")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random HunyuanDiT-v1.2 downloads in both layouts holding the same weights: a
    HunyuanDiT2DModel with CLIP 77x32 / mT5 256x24 captions, a 4-level AutoencoderKL (8x),
    a BertModel + WordPiece vocabulary, an MT5EncoderModel + SentencePiece model."""
    import json
    import random
    import shutil

    import sentencepiece as spm
    from diffusers import AutoencoderKL, DDPMScheduler
    from test_hunyuan import _official_layout
    from transformers import BertConfig, BertModel, MT5Config, MT5EncoderModel

    from skipdit_jax.encoders.hunyuan_text import DEFAULT_NEGATIVE_PROMPT

    root = tmp_path_factory.mktemp("hunyuan")
    diff, t2i_dir = root / "HunyuanDiT-v1.2-Diffusers", root / "HunyuanDiT-v1.2" / "t2i"
    ref = _tiny_diffusers(text_len=77, text_len_t5=256, clip_dim=32, t5_dim=24, seed=4)
    ref.save_pretrained(diff / "transformer")
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    (t2i_dir / "model").mkdir(parents=True)
    torch.save(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _official_layout(state).items()},
        t2i_dir / "model" / "pytorch_model_ema.pt",
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025,
        force_upcast=False,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae.save_pretrained(diff / "vae")
    vae.save_pretrained(t2i_dir / "sdxl-vae-fp16-fix")
    DDPMScheduler(**HUNYUAN_DDPM).save_pretrained(diff / "scheduler")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + HANZI + sorted(set(DEFAULT_NEGATIVE_PROMPT)) + WORDS
    for tok in (diff / "tokenizer", t2i_dir / "tokenizer"):
        tok.mkdir()
        (tok / "vocab.txt").write_text("\n".join(vocab) + "\n")
        (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "model_max_length": 77}))
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=40,
            max_position_embeddings=80,
        )
    )
    mt5 = MT5EncoderModel(
        MT5Config(
            vocab_size=192,
            d_model=24,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=3,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
        )
    )
    bert.save_pretrained(diff / "text_encoder")
    bert.save_pretrained(t2i_dir / "clip_text_encoder")
    mt5.save_pretrained(diff / "text_encoder_2")
    mt5.save_pretrained(t2i_dir / "mt5")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS + HANZI) for _ in range(rng.randint(3, 10))) for _ in range(200)]
    lines.append(DEFAULT_NEGATIVE_PROMPT)
    (root / "lines.txt").write_text("\n".join(lines))
    (diff / "tokenizer_2").mkdir()
    spm.SentencePieceTrainer.train(
        input=str(root / "lines.txt"),
        model_prefix=str(diff / "tokenizer_2" / "spiece"),
        vocab_size=80,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    shutil.copy(diff / "tokenizer_2" / "spiece.model", t2i_dir / "mt5" / "spiece.model")
    (diff / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanDiTPipeline"}))
    return diff, t2i_dir.parent, ref


def _cli(*argv):
    from skipdit_jax import cli

    return cli.main(["skipdit", "sample", *[str(a) for a in argv]])


def _fails(capsys, match, *argv):
    with pytest.raises(SystemExit) as e:
        _cli(*argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert match in err, err


SMALL = ("--any_resolution", "--height", 64, "--width", 48, "--steps", STEPS)
PROMPTS = ["a red cat runs over the city", "一个宇航员在骑马"]


def _api_images(diff, prompts, seeds, cache):
    """The same images from the Python API (compiled programs shared with the CLI runs)."""
    from skipdit_jax.encoders.hunyuan_text import hunyuan_condition, load_hunyuan_text_encoders

    folder = t2i.find_hunyuan_folder(diff)
    config, params = t2i.load_transformer(diff, 64, 48)
    cond = hunyuan_condition(load_hunyuan_text_encoders(diff), prompts)
    latents = t2i.sample_latents(
        config, params, cond, seeds, scheduler=t2i.load_scheduler(folder), num_steps=STEPS, cache=cache, compiled=True
    )
    return np.asarray(latents), t2i.decode_images(t2i.load_image_vae(folder), latents, len(seeds))


def test_cli_prompts_cache_and_speedup(folders, tmp_path):
    import json

    from PIL import Image

    diff = folders[0]
    out = tmp_path / "out"
    assert (
        _cli(
            diff,
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--cache",
            2,
            "--seed",
            5,
            "--batch_size",
            2,
            *SMALL,
            "--out",
            out,
        )
        == 0
    )
    report = json.loads((out / "samples.json").read_text())
    cache = t2i.hunyuan_skip_cache(2, 1)
    plan = cache.plan(t2i.load_scheduler().timesteps(STEPS), 6)
    assert (report["full_steps"], report["cached_steps"]) == (plan.num_full, plan.num_cached) == (6, 4)
    assert report["predicted_speedup"] == round(plan.predicted_speedup, 3) and report["measured_speedup"] > 0
    assert report["seeds"] == [5, 6] and report["cache"]["start_t"] == 700 and report["height"] == 64
    latents, pictures = _api_images(diff, PROMPTS, [5, 6], cache)
    np.testing.assert_allclose(np.load(out / "samples.npy"), latents, atol=1e-5)
    for j in range(2):
        png = np.asarray(Image.open(out / f"{j}.png"))
        assert png.shape == (64, 48, 3) and png.std() > 1
        np.testing.assert_array_equal(png, pictures[j])


def test_cli_captions_mode_official_layout(folders, tmp_path, capsys):
    import json

    from PIL import Image

    from skipdit_jax.commands import sample as sample_cmd
    from skipdit_jax.commands import sample_t2i as cmd

    diff, official = folders[:2]
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps([PROMPTS[0], {"caption": PROMPTS[1]}, "a blue bird at night"]))
    out = tmp_path / "coco"
    args = ("--model", "hunyuan", "--pipeline", official, "--prompts", caps, "--batch_size", 2, *SMALL)
    assert _cli(*args, "--out", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["file"] for m in manifest["images"]] == ["00000.png", "00001.png", "00002.png"]
    assert manifest["images"][1] == {"index": 1, "file": "00001.png", "seed": 1, "caption": PROMPTS[1]}
    first = [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(3)]
    # The official layout's weights are the diffusers folder's: the same images (seeds 0, 1).
    _, pictures = _api_images(diff, PROMPTS, [0, 1], None)
    np.testing.assert_array_equal(first[0], pictures[0])
    np.testing.assert_array_equal(first[1], pictures[1])
    # Resumable: only the missing image is sampled again, to the same bytes.
    (out / "00001.png").unlink()
    capsys.readouterr()
    assert _cli(*args, "--out", out) == 0
    assert "1 to sample" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00001.png")), first[1])
    _fails(capsys, "holds images of other settings (steps)", *args[:-1], 4, "--out", out)
    # Prompt embeddings from a file (skipdit encode-text) give the same images as the encoders.
    from skipdit_jax.encoders.hunyuan_text import (
        DEFAULT_NEGATIVE_PROMPT,
        encode_hunyuan_prompts,
        load_hunyuan_text_encoders,
        save_hunyuan_embeddings,
    )

    texts = [*PROMPTS, DEFAULT_NEGATIVE_PROMPT]
    save_hunyuan_embeddings(tmp_path / "emb.npz", texts, encode_hunyuan_prompts(load_hunyuan_text_encoders(diff), texts))
    emb_args = ("--embeddings", tmp_path / "emb.npz", "--prompt", "|".join(PROMPTS), "--batch_size", 2)
    assert _cli(diff, *emb_args, *SMALL, "--out", tmp_path / "emb") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "emb" / "1.png")), first[1])
    # A model directory (skipdit convert) with the folder's encoders and VAE.
    from skipdit_jax import model_store

    model_store.save_model(tmp_path / "model", *t2i.load_transformer(diff, 1024, 1024))
    md_args = ("--pipeline", official, "--prompt", "|".join(PROMPTS), "--batch_size", 2)
    assert _cli(tmp_path / "model", *md_args, *SMALL, "--out", tmp_path / "md") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "md" / "1.png")), first[1])
    _fails(capsys, "the text encoders come from --pipeline DIR", tmp_path / "model", "--prompt", "a cat", *SMALL)
    # The official weight file as MODEL (its family read from the keys), the diffusers folder's parts.
    pt_args = (official / "t2i" / "model" / "pytorch_model_ema.pt", "--pipeline", diff, *md_args[2:])
    assert _cli(*pt_args, *SMALL, "--out", tmp_path / "pt") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pt" / "1.png")), first[1])
    # Process 1 of 2 takes the odd indices, with the same seeds.
    fv = sample_cmd.flags.FlagValues()
    sample_cmd.define_flags(fv)
    fv(["skipdit", *[str(a) for a in args], "--out", str(tmp_path / "shard")])
    assert cmd.main_t2i([], fv, process_index=1, process_count=2) == 0
    assert sorted(p.name for p in (tmp_path / "shard").glob("*.png")) == ["00001.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "shard" / "00001.png")), first[1])


def test_cli_errors(folders, tmp_path, capsys, monkeypatch):
    import shutil

    from torch_reference import TorchDiT
    from torch_reference import numpy_state_dict as torch_numpy_state_dict

    diff, official = folders[:2]
    _fails(
        capsys,
        "unsupported resolution 1000x1000 (height x width); Hunyuan-DiT v1.2 supports 1024x1024",
        diff,
        "--prompt",
        "a cat",
        "--height",
        1000,
        "--width",
        1000,
    )
    _fails(capsys, "Hunyuan-DiT needs prompts", "--model", "hunyuan", "--pipeline", official)
    _fails(capsys, "--labels is not a text-to-image setting", diff, "--prompt", "a cat", "--labels", "1")
    _fails(capsys, "give --cache N too", diff, "--prompt", "a cat", "--cache_at_branch", 2)
    broken = tmp_path / "broken"
    shutil.copytree(diff, broken)
    (broken / "tokenizer" / "vocab.txt").unlink()
    _fails(capsys, "no CLIP tokenizer vocabulary", broken, "--prompt", "a cat", *SMALL)
    dit = tmp_path / "dit.pt"
    dit_state = torch_numpy_state_dict(TorchDiT(8, 2, 4, 32, 4, 4, num_classes=5))
    torch.save({k: torch.from_numpy(v) for k, v in dit_state.items()}, dit)
    _fails(
        capsys,
        "not a hunyuan checkpoint (it looks like a dit",
        dit,
        "--model",
        "hunyuan",
        "--pipeline",
        diff,
        "--prompt",
        "a cat",
        *SMALL,
    )
    _fails(capsys, "--height is for text-to-image models", dit, "--height", 1024, "--num_heads", 4)
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    repo = "hf://Tencent-Hunyuan/HunyuanDiT-v1.2"
    _fails(capsys, f"could not fetch {repo} from the Hugging Face Hub", repo, "--prompt", "a cat")
    # FSDP placement: straight from the conversion, and for a model directory.
    from skipdit_jax import model_store, sharding

    mesh = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    config, params = t2i.load_transformer(official, 64, 48, mesh=mesh)
    model_store.save_model(tmp_path / "model", config, params)
    for source in (params, t2i.load_transformer(tmp_path / "model", 64, 48, mesh=mesh)[1]):
        assert all(isinstance(a.sharding, jax.sharding.NamedSharding) for a in jax.tree.leaves(source))
    _fails(capsys, "does not cover the 1 available devices", diff, "--prompt", "a cat", "--fsdp", 3)
    # The official sampler's scheduler unless the diffusers folder's is asked for.
    import dataclasses
    import json

    cfg = json.loads((diff / "scheduler" / "scheduler_config.json").read_text()) | {"beta_end": 0.018}
    (tmp_path / "sched.json").write_text(json.dumps(cfg))
    folder = dataclasses.replace(t2i.find_hunyuan_folder(diff), scheduler_config=tmp_path / "sched.json")
    assert t2i.load_scheduler(folder).beta_end == 0.02 and t2i.load_scheduler(folder, from_folder=True).beta_end == 0.018
    with pytest.raises(UserError, match="has no scheduler/scheduler_config.json"):
        t2i.load_scheduler(t2i.find_hunyuan_folder(official), from_folder=True)


def test_convert_either_layout_to_one_model_directory(folders, tmp_path, capsys):
    """`skipdit convert` takes both HunyuanDiT-v1.2 layouts to the same model directory, and a
    family other than hunyuan for such a folder is one line."""
    from skipdit_jax import cli, model_store

    diff, official, _ = folders
    loaded = []
    for name, src in (("diffusers", diff), ("official", official)):
        assert cli.main(["skipdit", "convert", str(src), str(tmp_path / name)]) == 0
        config, params = model_store.load_model(str(tmp_path / name))
        assert config.family == "hunyuan" and config.latent_hw == (128, 128)
        loaded.append(params)
    jax.tree.map(np.testing.assert_array_equal, *loaded)
    with pytest.raises(SystemExit) as e:
        cli.main(["skipdit", "convert", str(diff), str(tmp_path / "x"), "--family", "latte_t2v"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "hunyuan" in err, err
