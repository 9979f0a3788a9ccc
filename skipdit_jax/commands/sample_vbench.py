"""`skipdit sample-vbench MODEL --prompt_dir DIR --out OUT`: the videos VBench scores, as the
official `sample_t2v_vbench.py` lays them out.

DIR is VBench's `prompts_per_dimension/`: one `<dimension>.txt` per dimension, one prompt per
line. For every prompt p of dimension d and i = 0..--seeds-1 this writes
OUT/<d>/<p>-<i>.mp4 (16 frames at 8 fps for Latte), sampled with seed --seed + i (so video i of
every prompt starts from the same noise, as the official script seeds it). The file name is the
prompt itself, stripped, as VBench expects; a prompt containing '/' (or a name over 255 bytes)
cannot be a file name and is refused before anything is sampled.

Sharded over processes (`jax.process_index()` of `jax.process_count()`): the (dimension, prompt)
pairs, in sorted-dimension then file order, go round-robin to the processes, every video of a
prompt to the same one (the official script's per-rank shift when a file exists is not
reproduced). Each process samples its videos --batch_size at a time (default: one per local
device), the batch split over its local devices. Resumable: a video whose file exists is skipped;
every file is written to a temporary name and renamed, so a killed run leaves no partial video.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import flags

from skipdit_jax import model_store, paths
from skipdit_jax.cache import parse_cache_spec
from skipdit_jax.commands import sample_t2v
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import family_of
from skipdit_jax.pipelines import text_to_video as t2v

USAGE = (
    "MODEL --prompt_dir DIR --out OUT [--seeds 5] [--seed 0] [--pipeline LATTE_DIR] [--t5 SPEC --tokenizer DIR | "
    "--embeddings FILE] [--cache N2-700-50] [--temporal_vae SPEC | --vae SPEC] [--batch_size B]"
)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("prompt_dir", None, "VBench's prompts_per_dimension folder (one .txt per dimension)", flag_values=fv)
    flags.DEFINE_string("out", None, "output folder: OUT/<dimension>/<prompt>-<i>.mp4", flag_values=fv)
    flags.DEFINE_integer("seeds", 5, "videos per prompt (VBench: 5)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "video i of each prompt uses seed + i", flag_values=fv)
    flags.DEFINE_integer("steps", t2v.LATTE_STEPS, "sampling steps", flag_values=fv)
    flags.DEFINE_float("cfg_scale", t2v.LATTE_CFG, "classifier-free guidance scale", flag_values=fv)
    flags.DEFINE_string("cache", None, "Skip-Cache spec, e.g. N2-700-50", flag_values=fv)
    flags.DEFINE_string("vae", None, "SD VAE (per-frame decoding) instead of the temporal decoder", flag_values=fv)
    flags.DEFINE_integer("decode_frames", 16, "--vae: frames per decoder call", flag_values=fv)
    flags.DEFINE_float("fps", t2v.LATTE_FPS, "frame rate of the MP4s", flag_values=fv)
    flags.DEFINE_integer(
        "batch_size", None, "videos per sampler call on this process (default: its local devices)", flag_values=fv
    )
    flags.DEFINE_integer("num_heads", None, "attention heads, for an official checkpoint file", flag_values=fv)
    flags.DEFINE_string("preset", None, "model preset, for an official checkpoint file", flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default: the model's)", flag_values=fv)
    sample_t2v.define_text_flags(fv, prompts=False)


@dataclasses.dataclass(frozen=True)
class Video:
    dimension: str
    prompt: str
    index: int
    seed: int

    @property
    def relpath(self) -> str:
        return f"{self.dimension}/{self.prompt.strip()}-{self.index}.mp4"


def read_prompt_dir(prompt_dir) -> list[tuple[str, list[str]]]:
    """[(dimension, prompts)] from DIR/*.txt, dimensions sorted, prompts in file order (line
    ends removed, blank lines skipped). One UserError for a prompt that cannot be a file name."""
    root = paths.as_path(prompt_dir)
    if not root.is_dir():
        raise UserError(f"--prompt_dir {root} is not a folder")
    files = sorted((p for p in root.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
    if not files:
        raise UserError(f"--prompt_dir {root} has no .txt files (VBench's prompts_per_dimension holds one per dimension)")
    out = []
    for f in files:
        prompts = [line.rstrip("\r\n") for line in f.read_text().splitlines()]
        prompts = [p for p in prompts if p.strip()]
        for n, p in enumerate(prompts, 1):
            if "/" in p or "\0" in p:
                raise UserError(f"{f}:{n}: prompt {p!r} contains '/', which cannot be in a file name")
            if len(f"{p.strip()}-0.mp4".encode()) > 255:
                raise UserError(f"{f}:{n}: prompt {p[:40]!r}... is too long for a file name (255 bytes)")
        out.append((f.name[: -len(".txt")], prompts))
    return out


def plan_videos(dimensions, seeds: int, seed: int, process_index: int = 0, process_count: int = 1) -> list[Video]:
    """This process's videos: (dimension, prompt) pair k goes to process k % process_count."""
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if not 0 <= process_index < process_count:
        raise UserError(f"process index {process_index} is not in 0..{process_count - 1}")
    pairs = [(d, p) for d, prompts in dimensions for p in prompts]
    return [
        Video(d, p, i, seed + i) for k, (d, p) in enumerate(pairs) if k % process_count == process_index for i in range(seeds)
    ]


def main(args: list[str], fv: flags.FlagValues, process_index: int | None = None, process_count: int | None = None) -> int:
    from skipdit_jax import videos

    if len(args) != 1:
        raise UserError(f"expected one MODEL argument; usage: skipdit sample-vbench {USAGE}")
    if not fv.prompt_dir or not fv.out:
        raise UserError(f"--prompt_dir and --out are required; usage: skipdit sample-vbench {USAGE}")
    if fv.batch_size is not None and fv.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {fv.batch_size}")
    cache = parse_cache_spec(fv.cache)
    spec = args[0]
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    todo = plan_videos(read_prompt_dir(fv.prompt_dir), fv.seeds, fv.seed, pi, pc)
    out = paths.as_path(fv.out)
    pending = [v for v in todo if not (out / v.relpath).exists()]
    print(f"process {pi}/{pc}: {len(todo)} videos, {len(todo) - len(pending)} already written, {len(pending)} to sample")
    if not pending:
        return 0
    folder = sample_t2v.pipeline_folder(fv, spec)
    kind = fv.scheduler or "ddim"
    scheduler = t2v.load_scheduler(folder, kind)
    if model_store.has_model_config(spec):
        config, params = model_store.read_model_config(spec), None
    else:
        config, params = sample_t2v.load_text_model(spec, fv)
    if family_of(config).condition_kind != "text":
        raise UserError(f"{spec} is a {family_of(config).name} model; sample-vbench needs a text-to-video model")
    if fv.dtype:
        config = config.replace(dtype=fv.dtype)
    family = family_of(config)
    t2v.build_t2v_sampler(config, scheduler, fv.steps, fv.cfg_scale, cache)  # setting checks before the weights
    prompts = list(dict.fromkeys(v.prompt for v in pending))
    emb = sample_t2v.text_source(fv, folder, prompts, config.caption_channels)
    if params is None:
        params = sample_t2v.load_text_model(spec, fv)[1]
    decoder = t2v.load_decoder(
        folder, vae=fv.vae, temporal_vae=fv.temporal_vae, frames_per_call=fv.decode_frames, latent_channels=family.eps_channels
    )

    devices = jax.local_devices()
    bs = fv.batch_size or len(devices)
    sharding = None
    if len(devices) > 1 and bs % len(devices) == 0:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    start, done = time.perf_counter(), 0
    for i in range(0, len(pending), bs):
        batch = pending[i : i + bs]
        padded = batch + [batch[-1]] * (bs - len(batch))  # one compiled batch shape
        cond = t2v.text_condition_for(emb, [v.prompt for v in padded], fv.negative_prompt)
        _, clips = t2v.generate_videos(
            config,
            params,
            cond,
            [v.seed for v in padded],
            scheduler=scheduler,
            num_steps=fv.steps,
            cfg_scale=fv.cfg_scale,
            cache=cache,
            decoder=decoder,
            sharding=sharding,
        )
        for v, clip in zip(batch, clips, strict=False):
            videos.write_mp4(out / v.relpath, clip, fps=fv.fps)
        done += len(batch)
        rate = (time.perf_counter() - start) / done
        print(f"{done}/{len(pending)} videos ({rate:.1f} s/video): {batch[-1].relpath}")
    return 0
