"""`skipdit sample` on a text-to-video model (Latte-T2V(-skip)): the flags and the run.

    skipdit sample MODEL --prompt "a cat walks on the grass" [--prompt ...| --prompts FILE | --embeddings FILE]
        [--pipeline LATTE_DIR] [--t5 SPEC --tokenizer DIR] [--cache N2-700-50] [--temporal_vae SPEC | --vae SPEC]

MODEL is a model directory (`skipdit convert`), Latte's diffusers folder (with `transformer/`) or
an official checkpoint file (`Latte-skip.pt`). LATTE_DIR (default: MODEL when it is a folder) is a
Latte-1 / Latte-0 download: its `text_encoder/`, `tokenizer/`, `scheduler/`, `vae_temporal_decoder/`
and `vae/` are the defaults of --t5, --tokenizer, the scheduler and the decoder. Video j uses seed
--seed + j. Writes OUT/sample_{j:03d}.mp4 and .gif (--fps, 8), samples.npy (the latents, NFHWC
float32) and samples.json (prompts, seeds, settings, timings, the cache's predicted and measured
speedups).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from skipdit_jax import model_store, paths
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import family_of
from skipdit_jax.pipelines import text_to_video as t2v

TEXT_FLAGS = ("prompt", "prompts", "embeddings", "t5", "tokenizer", "negative_prompt", "pipeline", "scheduler", "temporal_vae")


def define_text_flags(fv: flags.FlagValues, prompts: bool = True) -> None:
    """The text-to-video flags shared by `sample` and `sample-vbench` (the prompt flags only with `prompts`)."""
    if prompts:
        flags.DEFINE_multi_string("prompt", [], "text models: a prompt (repeatable, or several separated by '|')", flag_values=fv)
        flags.DEFINE_string("prompts", None, "text models: a file with one prompt per line", flag_values=fv)
    flags.DEFINE_string(
        "embeddings",
        None,
        "text models: prompt embeddings from skipdit encode-text (instead of --t5/--tokenizer)",
        flag_values=fv,
    )
    flags.DEFINE_string("t5", None, "text models: T5 v1.1 encoder (default: PIPELINE/text_encoder)", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "text models: T5 tokenizer folder (default: PIPELINE/tokenizer)", flag_values=fv)
    flags.DEFINE_enum("t5_dtype", "float32", ["float32", "bfloat16"], "text models: the T5 encoder's dtype", flag_values=fv)
    flags.DEFINE_string("negative_prompt", "", "text models: the unconditional prompt of guidance", flag_values=fv)
    flags.DEFINE_string(
        "pipeline",
        None,
        "text models: a Latte-1/Latte-0 folder with text_encoder/ tokenizer/ scheduler/ vae_temporal_decoder/ vae/ "
        "(default: MODEL when it is a folder)",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "scheduler", None, ["ddim", "ddpm"], "text models: diffusers scheduler (default ddim, Latte's)", flag_values=fv
    )
    flags.DEFINE_string(
        "temporal_vae", None, "text models: SVD temporal VAE decoder (default: PIPELINE/vae_temporal_decoder)", flag_values=fv
    )


def text_flags_given(fv: flags.FlagValues) -> list[str]:
    return [f"--{n}" for n in TEXT_FLAGS if n in fv and fv[n].present]


def read_prompts(fv: flags.FlagValues) -> list[str]:
    """--prompt (repeatable, '|'-separated) or --prompts FILE (one per line, blank lines skipped)."""
    if fv.prompt and fv.prompts:
        raise UserError("give --prompt or --prompts FILE, not both")
    if fv.prompts:
        path = paths.as_path(fv.prompts)
        if not path.is_file():
            raise UserError(f"prompt file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"prompt file {path} has no prompts")
        return prompts
    return [p.strip() for text in fv.prompt for p in text.split("|") if p.strip()]


def is_diffusers_folder(spec: str) -> bool:
    """A Latte diffusers folder (pipeline root with transformer/, or the transformer folder)."""
    if spec.startswith("hf://"):  # hf://org/repo[/subfolder] is a folder, hf://org/repo/file.pt a file
        return not spec.rstrip("/").endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    if model_store.has_model_config(spec):
        return False
    p = paths.as_path(spec)
    return p.is_dir() and ((p / "transformer" / "config.json").exists() or (p / "config.json").exists())


def pipeline_folder(fv, model_spec: str):
    if fv.pipeline:
        p = paths.as_path(fv.pipeline)
        if not p.is_dir():
            raise UserError(f"--pipeline {p} is not a folder")
        return p
    if not model_spec.startswith("hf://") and paths.as_path(model_spec).is_dir():
        return paths.as_path(model_spec)
    return None


def text_source(fv, folder, prompts, caption_channels: int):
    """The TextEmbeddings for `prompts` + the negative prompt, from --embeddings or the T5."""
    t5_spec, tok = fv.t5, fv.tokenizer
    if not fv.embeddings:
        if t5_spec is None and folder is not None and (folder / "text_encoder").is_dir():
            t5_spec = str(folder / "text_encoder")
        if tok is None and folder is not None and (folder / "tokenizer").is_dir():
            tok = str(folder / "tokenizer")
        if t5_spec is None or tok is None:
            missing = " and ".join(n for n, v in (("--t5", t5_spec), ("--tokenizer", tok)) if v is None)
            raise UserError(
                f"a text model needs {missing} (or --pipeline with text_encoder/ and tokenizer/, or --embeddings FILE)"
            )
    return t2v.prompt_embeddings(
        prompts,
        fv.negative_prompt,
        embeddings=fv.embeddings,
        t5=t5_spec,
        tokenizer=tok,
        caption_channels=caption_channels,
        t5_dtype=fv.t5_dtype,
    )


def settings(fv, folder):
    """(scheduler, steps, cfg_scale): Latte's DDIM-50 and 7.5 unless --steps / --cfg_scale are given."""
    kind = fv.scheduler or (fv.sampler if "sampler" in fv and fv["sampler"].present else "ddim")
    steps = fv.steps if fv["steps"].present else t2v.LATTE_STEPS
    cfg = fv.cfg_scale if fv["cfg_scale"].present else t2v.LATTE_CFG
    return t2v.load_scheduler(folder, kind), int(steps), float(cfg)


def load_text_model(spec: str, fv):
    if is_diffusers_folder(spec):
        from skipdit_jax.convert.latte_t2v import load_latte_t2v

        config, params = load_latte_t2v(spec, num_heads=fv.num_heads, preset=fv.preset)
    else:
        config, params = model_store.load_model(spec, num_heads=fv.num_heads, preset=fv.preset)
    if family_of(config).condition_kind != "text":
        raise UserError(f"{spec} is not a text-to-video model")
    return config, params


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def main_text(args: list[str], fv, cache, loaded=None) -> int:
    """The text-to-video run of `skipdit sample` (see the module docstring)."""
    from skipdit_jax import videos

    if fv.labels is not None:
        raise UserError("this is a text-to-video model: give prompts (--prompt TEXT), not --labels")
    for name in ("num", "cfg_channels", "clip_denoised"):
        if fv[name].present:
            raise UserError(f"--{name} is for class-conditional models; a text-to-video model samples one video per prompt")
    spec = args[0]
    folder = pipeline_folder(fv, spec)
    prompts = read_prompts(fv)
    if not prompts and fv.embeddings:
        from skipdit_jax.encoders.text import load_text_embeddings

        prompts = [p for p in load_text_embeddings(fv.embeddings).prompts if p != fv.negative_prompt]
    if not prompts:
        raise UserError("a text-to-video model needs prompts: --prompt TEXT (repeatable), --prompts FILE or --embeddings FILE")
    scheduler, steps, cfg_scale = settings(fv, folder)
    out = paths.as_path(fv.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    # A model directory's config is read on its own: the cache, the tokenizer and the T5's width
    # are checked before any large weights load.
    if loaded is None and model_store.has_model_config(spec):
        config, params = model_store.read_model_config(spec), None
    else:
        config, params = loaded if loaded is not None else load_text_model(spec, fv)
    if family_of(config).condition_kind != "text":
        raise UserError(f"{spec} is not a text-to-video model")
    if fv.dtype:
        config = config.replace(dtype=fv.dtype)
    family = family_of(config)
    fn = t2v.build_t2v_sampler(config, scheduler, steps, cfg_scale, cache)  # checks the cache against the model
    emb = text_source(fv, folder, prompts, config.caption_channels)
    if params is None:
        params = load_text_model(spec, fv)[1]
    decoder = t2v.load_decoder(
        folder, vae=fv.vae, temporal_vae=fv.temporal_vae, frames_per_call=fv.decode_frames, latent_channels=family.eps_channels
    )
    cond = t2v.text_condition_for(emb, prompts, fv.negative_prompt)
    seeds = [fv.seed + j for j in range(len(prompts))]
    scale = jnp.float32(cfg_scale)

    bs = min(fv.batch_size, len(prompts))
    batches = []
    for i in range(0, len(prompts), bs):
        keys, noise = t2v.make_noise(seeds[i : i + bs], family.sample_shape)
        batches.append((noise, {k: jnp.asarray(v[i : i + bs]) for k, v in cond.items()}, keys))
    family.check_condition(batches[0][1], batches[0][0].shape[0])
    t0 = time.perf_counter()
    compiled = {}
    for z, c, k in batches:
        if len(z) not in compiled:
            compiled[len(z)] = t2v.compiled_for(fn, params, z, c, scale, k)
    compile_s = time.perf_counter() - t0
    outs, sample_s, first_s = [], 0.0, None
    for z, c, k in batches:
        x, dt = _timed(compiled[len(z)], params, z, c, scale, k)
        outs.append(np.asarray(x))
        sample_s += dt
        first_s = dt if first_s is None else first_s
    latents = np.concatenate(outs)
    print(f"sampled {len(prompts)} x {latents.shape[1:]} in {sample_s:.2f} s ({compile_s:.1f} s compiling)")
    report = {
        "model": spec,
        "prompts": prompts,
        "negative_prompt": fv.negative_prompt,
        "seeds": seeds,
        "scheduler": dataclasses.asdict(scheduler) | {"kind": scheduler.kind},
        "steps": steps,
        "cfg_scale": cfg_scale,
        "cache": None if cache is None else dataclasses.asdict(cache),
        "compile_seconds": round(compile_s, 3),
        "sampling_seconds": round(sample_s, 3),
    }
    if cache is not None:
        plan = cache.plan(scheduler.timesteps(steps), family.depth_units)
        report.update(full_steps=plan.num_full, cached_steps=plan.num_cached, predicted_speedup=round(plan.predicted_speedup, 3))
        line = (
            f"Skip-Cache N={cache.interval} k={cache.shallow_blocks}: {plan.num_full} full / {plan.num_cached} cached steps, "
            f"predicted speedup {plan.predicted_speedup:.2f}x"
        )
        if fv.compare:
            z, c, k = batches[0]
            full_fn = t2v.compiled_for(t2v.build_t2v_sampler(config, scheduler, steps, cfg_scale, None), params, z, c, scale, k)
            _, t_full = _timed(full_fn, params, z, c, scale, k)
            report.update(measured_speedup=round(t_full / first_s, 3), full_seconds_first_batch=round(t_full, 3))
            line += f", measured {t_full / first_s:.2f}x ({t_full:.2f} s full vs {first_s:.2f} s cached, first batch)"
        print(line)

    clips = np.concatenate([decoder(latents[i : i + bs]) for i in range(0, len(latents), bs)])
    if decoder.kind == "latents":
        clips = np.clip(clips, -1.0, 1.0)
    clips = t2v.frames_to_uint8(clips)
    up = max(1, 128 // clips.shape[2])  # small frames (tiny models, latents) upscaled for viewing
    if up > 1:
        clips = clips.repeat(up, axis=2).repeat(up, axis=3)
    report.update(videos=decoder.note, fps=fv.fps, frames=int(latents.shape[1]))
    names = [f"sample_{j:03d}" for j in range(len(prompts))]
    for name, clip in zip(names, clips, strict=True):
        videos.write_mp4(out / f"{name}.mp4", clip, fps=fv.fps)
        videos.write_gif(out / f"{name}.gif", clip, fps=fv.fps)
    paths.save_npy(out / "samples.npy", latents)
    paths.atomic_write_text(out / "samples.json", json.dumps(report, indent=2))
    print(
        f"wrote {len(names)} videos of {latents.shape[1]} frames at {fv.fps:g} fps ({decoder.note}): "
        f"{out / names[0]}.mp4/.gif ... {names[-1]}.mp4/.gif, {out / 'samples.npy'} (latents, NFHWC float32) and samples.json"
    )
    return 0
