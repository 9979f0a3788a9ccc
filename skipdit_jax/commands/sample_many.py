"""`skipdit sample-many MODEL --num N --out DIR`: a large, resumable sample set for FID / FVD.

Sample i depends only on (--seed, i); the run is sharded over every device (and every
process, with the distributed flags), written in resumable shards and finished with
deterministic bytes (`skipdit_jax.sampling.many`) as an ADM `DIR/samples_{N}x{H}x{W}x3.npz`
for an image model, or `DIR/samples.npz` (arr_0 uint8 (N, F, H, W, 3), arr_1 labels) for
a video model (Latte), with `--videos` also DIR/videos/sample_{i:06d}.mp4.
`--preset fid50k` sets the official FID-50K sampling (DDPM 250, guidance 1.5 on 3
channels, 50000 samples, sd-vae-ft-ema); `--preset fvd2048` the official c2v FVD sampling
(DDPM 250, guidance 7.0 on all 4 channels for a class-conditional model, none for an
unconditional one, 2048 videos, sd-vae-ft-ema). Flags given explicitly win over a preset.
"""

from __future__ import annotations

import json

from absl import flags

from skipdit_jax import distributed, model_store, paths
from skipdit_jax.errors import UserError

USAGE = (
    "MODEL --num N --out DIR [--preset fid50k|fvd2048] [--sampler ddpm|ddim] [--steps N] [--cfg_scale S] [--cfg_channels C] "
    "[--cache N[,k[,start,close]] | --cache METHOD:SETTING] [--vae SPEC] [--batch_size 32] [--seed 0] [--png | --videos] "
    "[--coordinator_address HOST:PORT --num_processes N --process_id I]"
)

# Flags a preset may set, with their values when neither the preset nor the user does.
_PRESET_FLAGS = {"sampler": "ddpm", "steps": 250, "cfg_scale": 1.0, "cfg_channels": None, "num": None, "vae": None}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "output directory (local or gs://); a re-run with the same settings resumes", flag_values=fv)
    flags.DEFINE_string(
        "preset", None,
        "sampling preset: fid50k (official FID-50K settings, image models) or fvd2048 (official c2v FVD settings, video "
        "models); explicit flags win",
        flag_values=fv,
    )
    flags.DEFINE_integer("num", None, "number of samples", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "global seed: sample i depends on (seed, i) only", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "global batch (a multiple of the device count); also the shard size", flag_values=fv)
    flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "ancestral DDPM or DDIM (default ddpm)", flag_values=fv)
    flags.DEFINE_integer(
        "steps", None, "sampling steps (ADM respacing 'N' for ddpm, 'ddimN' for ddim; default 250)", flag_values=fv
    )
    flags.DEFINE_float("eta", 0.0, "DDIM eta (> 0 adds per-step noise)", flag_values=fv)
    flags.DEFINE_float("cfg_scale", None, "classifier-free guidance scale (default 1 = off)", flag_values=fv)
    flags.DEFINE_integer("cfg_channels", None, "guide only the first C output channels (3 = official DiT)", flag_values=fv)
    flags.DEFINE_string("classes", None, "comma-separated class ids to draw labels from (default: every class)", flag_values=fv)
    flags.DEFINE_string(
        "cache", None,
        "Skip-Cache spec N[,shallow_blocks[,start_t,close_t]], or METHOD:SETTING for another cache "
        "(skip-cache, shallow-cache, fora, pab, delta-dit: an interval N; teacache: a threshold)",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "vae", None, "SD VAE to decode latents: a diffusers folder, .safetensors or hf://org/repo", flag_values=fv
    )
    flags.DEFINE_bool("png", False, "image models: also write DIR/png/000000.png ...", flag_values=fv)
    flags.DEFINE_bool("videos", False, "video models: also write DIR/videos/sample_000000.mp4 ... (H.264)", flag_values=fv)
    flags.DEFINE_float("fps", 8.0, "frame rate of the --videos MP4s", flag_values=fv)
    flags.DEFINE_integer(
        "decode_frames", 16, "video models: frames per device per VAE decoder call (bounds memory)", flag_values=fv
    )
    flags.DEFINE_bool(
        "compare", True, "with a cache, time one batch without it for the measured speedup (--nocompare skips)", flag_values=fv
    )
    flags.DEFINE_bool("keep_shards", False, "keep DIR/shards after the final .npz is written", flag_values=fv)
    flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)
    flags.DEFINE_bool("clip_denoised", False, "clip the x0 prediction to [-1, 1] (pixel-space models)", flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default: the model's)", flag_values=fv)
    flags.DEFINE_integer("num_heads", None, "attention heads, for an official checkpoint file", flag_values=fv)
    flags.DEFINE_string("model_preset", None, "model preset, for an official checkpoint file (e.g. DiT-XL/2)", flag_values=fv)
    distributed.define_flags(fv)


def parse_cache(spec: str | None):
    """`N[,k[,start,close]]` (SkipCache) or `METHOD:SETTING[,k]` (`cache.make_cache`)."""
    from skipdit_jax.cache import make_cache, parse_cache_spec

    if spec is None or ":" not in spec:
        return parse_cache_spec(spec)
    method, _, rest = spec.partition(":")
    parts = rest.split(",")
    try:
        setting = float(parts[0])
        shallow = [int(p) for p in parts[1:]]
    except ValueError:
        raise UserError(f"bad cache spec {spec!r}: expected METHOD:SETTING[,shallow_blocks]") from None
    if len(shallow) > 1:
        raise UserError(f"bad cache spec {spec!r}: expected METHOD:SETTING[,shallow_blocks]")
    return make_cache(method, setting, *shallow)


def _parse_classes(text: str | None):
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--classes must be comma-separated integers, got {text!r}") from None


def resolve(fv: flags.FlagValues, config=None) -> dict:
    """The sampling settings: explicit flags, else the preset's, else the defaults. With
    the model's config, the preset is checked against the model and takes its per-model
    values (fvd2048: no guidance for an unconditional model)."""
    from skipdit_jax.sampling.many import get_preset

    preset = get_preset(fv.preset, config)
    return {name: fv[name].value if fv[name].present else preset.get(name, default) for name, default in _PRESET_FLAGS.items()}


def main(args: list[str], fv: flags.FlagValues) -> int:
    if len(args) != 1:
        raise UserError(f"expected one MODEL argument; usage: skipdit sample-many {USAGE}")
    s = resolve(fv)
    if not fv.out:
        raise UserError("--out is required")
    if s["num"] is None:
        raise UserError("--num is required (or --preset fid50k for 50000 images, fvd2048 for 2048 videos)")
    if fv.fps <= 0:
        raise UserError(f"--fps must be > 0, got {fv.fps}")
    if fv.decode_frames < 1:
        raise UserError(f"--decode_frames must be >= 1, got {fv.decode_frames}")
    if s["num"] < 1:
        raise UserError(f"--num must be >= 1, got {s['num']}")
    if s["cfg_channels"] is not None and s["cfg_channels"] < 1:
        raise UserError(f"--cfg_channels must be >= 1 (or unset for all channels), got {s['cfg_channels']}")
    out = paths.as_path(fv.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    cache, classes = parse_cache(fv.cache), _parse_classes(fv.classes)
    from skipdit_jax.sampling import resolve_respacing

    resolve_respacing(s["sampler"], s["steps"], None)
    distributed.initialize_from_flags(fv)

    from skipdit_jax.sampling.many import check_run, sample_many

    def checks(config) -> dict:
        s.update(resolve(fv, config))  # the preset's per-model values
        return dict(
            num=s["num"], seed=fv.seed, batch_size=fv.batch_size, cfg_scale=s["cfg_scale"], cfg_channels=s["cfg_channels"],
            cache=cache, classes=classes, eta=fv.eta, sampler=s["sampler"], png=fv.png, videos=fv.videos,
        )

    if model_store.has_model_config(args[0]):  # every check before loading weights
        early = model_store.read_model_config(args[0])
        check_run(early, **checks(early))
    config, params = model_store.load_model(args[0], num_heads=fv.num_heads, preset=fv.model_preset)
    if fv.dtype:
        config = config.replace(dtype=fv.dtype)
    check_run(config, **checks(config))
    vae = None
    if s["vae"]:
        from skipdit_jax.encoders import vae as vae_lib

        vae = vae_lib.load_vae(s["vae"])

    summary = sample_many(
        config, params, out, num=s["num"], seed=fv.seed, sampler=s["sampler"], num_steps=s["steps"], eta=fv.eta,
        cfg_scale=s["cfg_scale"], cfg_channels=s["cfg_channels"], cache=cache, vae=vae, vae_spec=s["vae"], classes=classes,
        clip_denoised=fv.clip_denoised, batch_size=fv.batch_size, png=fv.png, videos=fv.videos, fps=fv.fps,
        decode_frames=fv.decode_frames, compare=fv.compare, keep_shards=fv.keep_shards,
        model=args[0], progress=fv.progress,
    )
    import jax

    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
        kind = "videos" if summary.get("videos") else "images"
        line = f"wrote {summary['npz']}: {summary['images']} new {kind}"
        if summary["images"]:
            line += (
                f" in {summary['seconds']:.1f} s ({summary['images_per_s']:.2f} {kind}/s, "
                f"{summary['compile_seconds']:.1f} s compiling, "
                f"{100 * summary['outside_fraction']:.1f}% of the time outside the jitted sampler)"
            )
        if "measured_speedup" in summary:
            full, cached = summary["full_seconds_batch"], summary["cached_seconds_batch"]
            line += f"; cache speedup {summary['measured_speedup']:.2f}x ({full:.3g} s vs {cached:.3g} s per batch)"
            if "predicted_speedup" in summary:
                line += f", predicted {summary['predicted_speedup']:.2f}x from the block counts"
        print(line)
    return 0
