"""`skipdit sample` on Hunyuan-DiT v1.2 (text-to-image): the flags and the run.

    skipdit sample --model hunyuan --pipeline DIR --prompt "一只小猫" [--prompt ...] [--height 1024 --width 1024]
        [--cache N [--cache_at_branch k]] [--steps 100] [--cfg_scale 6] [--negative_prompt TEXT] [--seed S] [--out OUT]
    skipdit sample MODEL [--pipeline DIR] ...            MODEL: a model directory, a HunyuanDiT-v1.2(-Diffusers)
                                                         folder, or the weight file (pytorch_model_ema.pt)
    skipdit sample --model hunyuan --pipeline DIR --prompts captions.json --out OUT     (the COCO-captions mode)

DIR is a HunyuanDiT-v1.2-Diffusers download (transformer/, vae/, scheduler/, text_encoder/,
text_encoder_2/, tokenizer/, tokenizer_2/) or the official HunyuanDiT-v1.2 one (t2i/model/,
t2i/sdxl-vae-fp16-fix/, t2i/clip_text_encoder/, t2i/tokenizer/, t2i/mt5/); it is MODEL's default
when MODEL is such a folder. Either may be "hf://Tencent-Hunyuan/HunyuanDiT-v1.2[-Diffusers]"
(only the parts sampling reads are fetched). --clip / --clip_tokenizer / --t5 / --tokenizer replace single encoder
parts (--t5 and --tokenizer name mT5 and its tokenizer), --vae the SDXL VAE, --embeddings FILE
(`skipdit encode-text --family hunyuan`) the encoders altogether.

Image j uses seed --seed + j (in the captions mode j is the caption's index); --batch_size images
per sampler call (default 1, the official batch). With --prompt the
run writes OUT/<j>.png, samples.npy (the latents, NHWC float32) and samples.json (prompts,
seeds, settings, timings and, with --cache, the schedule's predicted and the measured speedup).

--prompts FILE (a JSON list of captions, or of objects with a "caption", or one caption per line)
is the COCO-captions mode of the official `sample_t2i_ddp.py`: one image per caption,
OUT/<index:05d>.png, and OUT/manifest.json (settings; index, file, seed and caption of every
image). Captions go round-robin to the processes (index % process_count); resumable (an
existing PNG is skipped; a manifest of other settings is refused) and every file is written to
a temporary name and renamed.

In both modes a batch is split over the process's devices when it divides them; --fsdp N
shards the DiT's parameters over N of them (FSDP) and the batch over the rest.
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
from skipdit_jax.pipelines import text_to_image as t2i
from skipdit_jax.pipelines.common import compiled_for, make_noise

CLASS_FLAGS = ("labels", "num", "cfg_channels", "clip_denoised", "temporal_vae")


def define_t2i_flags(fv: flags.FlagValues) -> None:
    """The text-to-image flags `sample` does not already have."""
    flags.DEFINE_enum(
        "model", None, ["hunyuan"], "text-to-image: the model family when MODEL is not given (with --pipeline)", flag_values=fv
    )
    flags.DEFINE_integer("height", 1024, "text-to-image: image height (an official Hunyuan-DiT resolution)", flag_values=fv)
    flags.DEFINE_integer("width", 1024, "text-to-image: image width (an official Hunyuan-DiT resolution)", flag_values=fv)
    flags.DEFINE_bool(
        "any_resolution", False, "text-to-image: allow any height/width divisible by 16 (small test models)", flag_values=fv
    )
    flags.DEFINE_integer("cache_at_branch", 1, "text-to-image: blocks a cached step runs at each end (k)", flag_values=fv)
    flags.DEFINE_string("clip", None, "text-to-image: CLIP text encoder folder (default: from --pipeline)", flag_values=fv)
    flags.DEFINE_string("clip_tokenizer", None, "text-to-image: CLIP tokenizer folder (default: from --pipeline)", flag_values=fv)
    flags.DEFINE_integer(
        "fsdp", 1, "text-to-image: shard the DiT's parameters over N local devices (the batch over the others)", flag_values=fv
    )
    flags.DEFINE_bool(
        "folder_scheduler",
        False,
        "text-to-image: the diffusers folder's scheduler config instead of the official sampler's settings (beta_end 0.02)",
        flag_values=fv,
    )


def wants_t2i(args: list[str], fv: flags.FlagValues) -> bool:
    """Whether `skipdit sample` runs the text-to-image pipeline: --model hunyuan, a Hunyuan-DiT
    folder in either layout, or a model directory of the hunyuan family."""
    if fv.model == "hunyuan":
        return True
    if len(args) != 1:
        return False
    if model_store.has_model_config(args[0]):
        return model_store.read_model_config(args[0]).family == "hunyuan"
    return t2i.is_hunyuan_folder(args[0])


# ---- inputs -----------------------------------------------------------------------------------
def read_captions(path) -> list[str]:
    """Captions of a --prompts FILE: a JSON list of strings (the official caption.json) or of
    objects with a "caption" key, else one caption per line (blank lines skipped)."""
    p = paths.as_path(path)
    if not p.is_file():
        raise UserError(f"caption file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.name.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f"{p} is not valid JSON: {e}") from None
        items = data if isinstance(data, list) else None
        captions = [c.get("caption") if isinstance(c, dict) else c for c in (items or [])]
        if items is None or not all(isinstance(c, str) for c in captions):
            raise UserError(f'{p} must hold a JSON list of captions (strings, or objects with a "caption")')
    else:
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise UserError(f"caption file {p} has no captions")
    return captions


def _resolution(fv) -> tuple[int, int]:
    h, w = int(fv.height), int(fv.width)
    if not fv.any_resolution:
        return t2i.check_resolution(h, w)
    if h < 16 or w < 16 or h % 16 or w % 16:
        raise UserError(f"--height and --width must be positive multiples of 16, got {h}x{w}")
    return h, w


def _folder_and_spec(args, fv):
    """(HunyuanFolder or None, the model spec)."""
    spec = args[0] if args else None
    model_folder = t2i.find_hunyuan_folder(spec) if spec is not None and t2i.is_hunyuan_folder(spec) else None
    if model_folder is not None:
        spec = str(model_folder.root)  # an hf:// folder: its local snapshot
    folder = t2i.find_hunyuan_folder(fv.pipeline) if fv.pipeline else model_folder
    if spec is None:
        if folder is None:
            raise UserError(
                "--model hunyuan needs --pipeline DIR (a HunyuanDiT-v1.2 or HunyuanDiT-v1.2-Diffusers folder) or MODEL"
            )
        spec = str(folder.root)
    return folder, spec


def _settings(fv, folder):
    kind = fv.scheduler or (fv.sampler if fv["sampler"].present else "ddpm")
    steps = int(fv.steps) if fv["steps"].present else t2i.HUNYUAN_STEPS
    cfg = float(fv.cfg_scale) if fv["cfg_scale"].present else t2i.HUNYUAN_CFG
    return t2i.load_scheduler(folder, kind, from_folder=fv.folder_scheduler), steps, cfg


class _Text:
    """Prompts -> the 8-key condition, from the encoders or an embedding file."""

    def __init__(self, fv, folder):
        from skipdit_jax.encoders import hunyuan_text

        self.negative = fv.negative_prompt or hunyuan_text.DEFAULT_NEGATIVE_PROMPT
        if fv.embeddings:
            self.file, self.encoders = hunyuan_text.load_hunyuan_embeddings(fv.embeddings), None
        else:
            self.file = None
            parts = (fv.clip, fv.t5, fv.clip_tokenizer, fv.tokenizer)
            if folder is None and not all(parts):
                raise UserError(
                    "the text encoders come from --pipeline DIR (a HunyuanDiT-v1.2 or -Diffusers folder); without one give "
                    "--clip, --clip_tokenizer, --t5 (mT5) and --tokenizer (mT5's), or --embeddings FILE"
                )
            self.encoders = hunyuan_text.load_hunyuan_text_encoders(
                folder.text_root if folder is not None else None,
                clip=fv.clip,
                mt5=fv.t5,
                clip_tokenizer=fv.clip_tokenizer,
                t5_tokenizer=fv.tokenizer,
                dtype=fv.t5_dtype,
            )

    def widths(self) -> tuple[int, int] | None:
        if self.encoders is None:
            return self.file.arrays["clip_emb"].shape[2], self.file.arrays["t5_emb"].shape[2]
        return self.encoders.bert_config.hidden_size, self.encoders.t5_config.d_model

    def condition(self, prompts):
        from skipdit_jax.encoders import hunyuan_text

        if self.file is not None:
            return self.file.condition(prompts, self.negative)
        return hunyuan_text.hunyuan_condition(self.encoders, prompts, self.negative)


def _check_widths(config, widths) -> None:
    want = (config.cross_attention_dim, config.cross_attention_dim_t5)
    if tuple(widths) != want:
        raise UserError(
            f"the text encoders give widths {widths[0]} (CLIP) and {widths[1]} (mT5) but the model takes "
            f"{want[0]} and {want[1]}: "
            "use the encoders of the same HunyuanDiT-v1.2 download"
        )


def _mesh(fv):
    """The ('data', 'fsdp') mesh over this process's devices, or None (one device, or --fsdp 1
    with a batch that does not divide them)."""
    from skipdit_jax import sharding

    if fv.fsdp < 1:
        raise UserError(f"--fsdp must be >= 1, got {fv.fsdp}")
    devices = jax.local_devices()
    if fv.fsdp == 1 and len(devices) == 1:
        return None
    return sharding.make_mesh(data=-1, fsdp=fv.fsdp, devices=devices)


def _placement(config, params, mesh, bs: int):
    """(params, batch sharding or None): the parameters FSDP-sharded over the mesh's fsdp
    axis (replicated with --fsdp 1), the batch split over the data axis when it divides."""
    params = t2i.place_params(config, params, mesh)  # once, not at every call
    if mesh is None:
        return params, None
    spec = jax.sharding.PartitionSpec("data") if bs % mesh.shape["data"] == 0 else jax.sharding.PartitionSpec()
    return params, jax.sharding.NamedSharding(mesh, spec)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def _batch_args(config, params, cond, seeds, cfg_scale, sharding):
    keys, noise = make_noise(seeds, family_of(config).sample_shape)
    cond = {k: jnp.asarray(v) for k, v in cond.items()}
    if sharding is not None:
        keys, noise, cond = jax.device_put((keys, noise, cond), sharding)
    return params, noise, cond, jnp.float32(cfg_scale), keys


# ---- the run -----------------------------------------------------------------------------------
def main_t2i(args: list[str], fv, loaded=None, process_index: int | None = None, process_count: int | None = None) -> int:
    """The text-to-image run of `skipdit sample` (see the module docstring). `loaded`: the
    (config, params) of MODEL when the caller has read them already."""
    if len(args) > 1:
        raise UserError("expected at most one MODEL argument")
    given = [f"--{n}" for n in CLASS_FLAGS if n in fv and fv[n].present]
    if given:
        raise UserError(f"{given[0]} is not a text-to-image setting (Hunyuan-DiT samples one image per prompt)")
    if fv.prompt and fv.prompts:
        raise UserError("give --prompt (images OUT/<j>.png) or --prompts FILE (the captions mode), not both")
    if fv.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {fv.batch_size}")
    height, width = _resolution(fv)
    if fv["cache_at_branch"].present and not fv.cache:
        raise UserError("--cache_at_branch sets the blocks a cached step computes: give --cache N too")
    cache = t2i.parse_t2i_cache(fv.cache, fv.cache_at_branch)
    mesh = _mesh(fv)
    folder, spec = _folder_and_spec(args, fv)
    scheduler, steps, cfg_scale = _settings(fv, folder)
    out = paths.as_path(fv.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    captions = read_captions(fv.prompts) if fv.prompts else None
    prompts = [p.strip() for text in fv.prompt for p in text.split("|") if p.strip()]
    if captions is None and not prompts:
        raise UserError("Hunyuan-DiT needs prompts: --prompt TEXT (repeatable) or --prompts FILE (one image per caption)")
    # Cheap checks on a model directory's config before anything large loads.
    if loaded is None and model_store.has_model_config(spec):
        config = model_store.read_model_config(spec)
        if family_of(config).name != "hunyuan":
            raise UserError(f"{spec} is a {family_of(config).name} model, not a Hunyuan-DiT")
        t2i.build_t2i_sampler(config.replace(**t2i.latent_size(height, width)), scheduler, steps, cfg_scale, cache)
    settings = {
        "model": spec,
        "pipeline": None if folder is None else str(folder.root),
        "height": height,
        "width": width,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "scheduler": dataclasses.asdict(scheduler) | {"kind": scheduler.kind},
        "cache": None if cache is None else dataclasses.asdict(cache),
        "seed": fv.seed,
        "dtype": fv.dtype,
    }
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if captions is not None:
        todo = [i for i in range(len(captions)) if i % pc == pi and not (out / f"{i:05d}.png").exists()]
        settings["negative_prompt"] = fv.negative_prompt or None
        _check_manifest(out, settings, captions, fv.seed, write=pi == 0)
        print(f"process {pi}/{pc}: {sum(i % pc == pi for i in range(len(captions)))} captions, {len(todo)} to sample")
        if not todo:
            return 0
    text = _Text(fv, folder)
    if loaded is not None:
        config, params = loaded
        config = config.replace(**t2i.latent_size(height, width), **({"dtype": fv.dtype} if fv.dtype else {}))
    else:
        config, params = t2i.load_transformer(spec, height, width, dtype=fv.dtype, mesh=mesh)
    _check_widths(config, text.widths())
    fn = t2i.build_t2i_sampler(config, scheduler, steps, cfg_scale, cache)
    vae = t2i.load_image_vae(folder, fv.vae, family_of(config).eps_channels)
    # One image per call unless asked (the official batch; at 1024 px a float32 attention
    # matrix of the guided batch is 2 GB per image and block).
    bs = fv.batch_size if fv["batch_size"].present else 1
    bs = bs if captions is not None else min(bs, len(prompts))
    params, sharding = _placement(config, params, mesh, bs)
    if captions is not None:
        return _captions_mode(out, captions, todo, text, config, params, fn, vae, bs, cfg_scale, sharding, fv.seed)

    seeds = [fv.seed + j for j in range(len(prompts))]
    cond = text.condition(prompts)
    batches = []
    for i in range(0, len(prompts), bs):
        rows = list(range(i, min(i + bs, len(prompts))))
        rows += [rows[-1]] * (bs - len(rows))  # one compiled batch shape
        batches.append(
            (
                rows,
                _batch_args(config, params, {k: v[rows] for k, v in cond.items()}, [seeds[r] for r in rows], cfg_scale, sharding),
            )
        )
    t0 = time.perf_counter()
    compiled = compiled_for(fn, *batches[0][1])
    compile_s = time.perf_counter() - t0
    latents, sample_s, first_s = [], 0.0, None
    for _, batch in batches:
        x, dt = _timed(compiled, *batch)
        n_real = min(bs, len(prompts) - len(latents))
        latents.extend(np.asarray(x, np.float32)[:n_real])
        sample_s += dt
        first_s = dt if first_s is None else first_s
    latents = np.stack(latents)
    print(f"sampled {len(prompts)} images of {height}x{width} in {sample_s:.2f} s ({compile_s:.1f} s compiling)")
    report = settings | {
        "prompts": prompts,
        "negative_prompt": text.negative,
        "seeds": seeds,
        "compile_seconds": round(compile_s, 3),
        "sampling_seconds": round(sample_s, 3),
    }
    if cache is not None:
        report.update(_speedup(cache, scheduler, steps, config, cfg_scale, batches[0][1], first_s, fv.compare))
    pictures = t2i.decode_images(vae, latents, bs)
    from PIL import Image

    for j, picture in enumerate(pictures):
        paths.save_png(out / f"{j}.png", Image.fromarray(picture))
    paths.save_npy(out / "samples.npy", latents)
    paths.atomic_write_text(out / "samples.json", json.dumps(report, indent=2, ensure_ascii=False))
    names = f"{out / '0.png'}" + (f" ... {len(prompts) - 1}.png" if len(prompts) > 1 else "")
    print(f"wrote {names}, samples.npy (latents, NHWC float32) and samples.json")
    return 0


def _speedup(cache, scheduler, steps, config, cfg_scale, batch, cached_s, compare: bool) -> dict:
    """The schedule's block-count prediction and, with `compare`, the measured speedup of the
    first batch (the uncached sampler compiled and timed on the same inputs)."""
    plan = cache.plan(scheduler.timesteps(steps), family_of(config).depth_units)
    report = dict(full_steps=plan.num_full, cached_steps=plan.num_cached, predicted_speedup=round(plan.predicted_speedup, 3))
    line = (
        f"Skip-Cache N={cache.interval} k={cache.shallow_blocks}: {plan.num_full} full / {plan.num_cached} cached steps, "
        f"predicted speedup {plan.predicted_speedup:.2f}x"
    )
    if compare:
        full = compiled_for(t2i.build_t2i_sampler(config, scheduler, steps, cfg_scale, None), *batch)
        _, t_full = _timed(full, *batch)
        report.update(
            measured_speedup=round(t_full / cached_s, 3),
            full_seconds_first_batch=round(t_full, 3),
            cached_seconds_first_batch=round(cached_s, 3),
        )
        line += f", measured {t_full / cached_s:.2f}x ({t_full:.2f} s full vs {cached_s:.2f} s cached, first batch)"
    print(line)
    return report


def _check_manifest(out, settings: dict, captions: list[str], seed: int, write: bool) -> None:
    """OUT/manifest.json: written once (by process 0); a manifest of other settings or captions
    means OUT holds another run's images, which is refused."""
    path = out / "manifest.json"
    images = [{"index": i, "file": f"{i:05d}.png", "seed": seed + i, "caption": c} for i, c in enumerate(captions)]
    manifest = {"settings": settings, "images": images}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{path} is not valid JSON; remove it or use another --out") from None
        # Where the weights were read from may change between runs (another mount, a relative
        # path); what the images depend on may not.
        if _comparable(old) != _comparable(json.loads(json.dumps(manifest))):
            changed = [k for k in settings if old.get("settings", {}).get(k) != json.loads(json.dumps(settings)).get(k)]
            what = f"settings ({', '.join(changed)})" if changed else "captions"
            raise UserError(f"{out} holds images of other {what}: use another --out or remove {path}")
    elif write:
        paths.atomic_write_text(path, json.dumps(manifest, indent=1, ensure_ascii=False))


def _comparable(manifest: dict) -> dict:
    """A manifest without the paths the weights were read from (another mount or a relative
    path on resume is fine; other sampling settings are not)."""
    settings = {k: v for k, v in manifest.get("settings", {}).items() if k not in ("model", "pipeline")}
    return {**manifest, "settings": settings}


def _captions_mode(out, captions, todo, text, config, params, fn, vae, bs, cfg_scale, sharding, seed) -> int:
    from PIL import Image

    start, done, compiled = time.perf_counter(), 0, None
    for i in range(0, len(todo), bs):
        rows = todo[i : i + bs]
        padded = rows + [rows[-1]] * (bs - len(rows))
        batch = _batch_args(
            config, params, text.condition([captions[r] for r in padded]), [seed + r for r in padded], cfg_scale, sharding
        )
        compiled = compiled or compiled_for(fn, *batch)
        latents = np.asarray(jax.block_until_ready(compiled(*batch)), np.float32)
        for r, picture in zip(rows, t2i.decode_images(vae, latents, bs), strict=False):
            paths.save_png(out / f"{r:05d}.png", Image.fromarray(picture))
        done += len(rows)
        print(f"{done}/{len(todo)} images ({(time.perf_counter() - start) / done:.2f} s/image): {out / f'{rows[-1]:05d}.png'}")
    return 0
