"""`skipdit extract-latents IMAGE_FOLDER OUT_PATH --vae SPEC`: VAE latents for latent training.

Reads an ImageNet-layout folder (ROOT/CLASS/IMAGE, classes sorted -> label ids) with the ADM
centre crop, encodes every image (and, with --flip, its horizontal mirror) with the SD VAE
as DiT's extraction does (a posterior sample times the scaling factor 0.18215), and writes
ArrayRecord shards plus latents.json to OUT_PATH, ready for `skipdit_jax.data.LatentSource`.
Both paths may be local or remote (gs://...); a remote OUT_PATH is written locally first
(see `skipdit_jax.data.latents`). An existing OUT_PATH (--overwrite) is replaced only once
the new latents are complete.

Batches are split over all local devices (a 1-D "data" mesh); the last batch is padded to
the full size so the encoder compiles once. The posterior noise of batch i comes from
fold_in(key(seed), i), so a run is reproducible for a given seed and batch size.
"""

from __future__ import annotations

import functools
import math
import time

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from skipdit_jax import data
from skipdit_jax.data.latents import check_latents_output
from skipdit_jax.errors import UserError

USAGE = "IMAGE_FOLDER OUT_PATH --vae SPEC [--image_size 256] [--batch_size 32] [--flip=true] [--seed 0] [--num_shards N] [--overwrite]"

_SHARD_TARGET_BYTES = 1 << 30  # about 1 GiB per shard: few files, each still easy to copy


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("vae", None, "SD VAE: a diffusers folder, .safetensors or hf://org/repo (required)", flag_values=fv)
    flags.DEFINE_integer("image_size", 256, "ADM centre-crop size; a multiple of the VAE's downsampling (8)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per encoder call, split over the local devices", flag_values=fv)
    flags.DEFINE_bool("flip", True, "also store the latent of each horizontally flipped image", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the posterior samples", flag_values=fv)
    flags.DEFINE_integer("num_shards", None, "ArrayRecord shards to write (default: about 1 GiB each)", flag_values=fv)
    flags.DEFINE_integer("read_threads", 8, "threads decoding and cropping images", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace latents already in OUT_PATH", flag_values=fv)


def _build_encoder(vae_params, config, flip: bool, mesh):
    """A jitted (params, images, key) -> (latents, flipped latents or None), batch-sharded."""
    from skipdit_jax.encoders.vae import encode_to_latents

    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def encode(params, images, key):
        key_plain, key_flip = jax.random.split(key)
        latents = encode_to_latents(params, config, images, key_plain)
        flipped = encode_to_latents(params, config, images[:, :, ::-1], key_flip) if flip else None
        return latents, flipped

    fn = jax.jit(encode, in_shardings=(replicated, batch, replicated), out_shardings=batch)
    return fn, jax.device_put(vae_params, replicated), batch


def main(args: list[str], fv: flags.FlagValues) -> int:
    if len(args) != 2:
        raise UserError(f"expected IMAGE_FOLDER and OUT_PATH, got {len(args)} positional argument(s); usage: skipdit extract-latents {USAGE}")
    folder, out_path = args
    if not fv.vae:
        raise UserError("--vae is required (e.g. --vae hf://stabilityai/sd-vae-ft-ema)")
    if fv.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {fv.batch_size}")
    if fv.num_shards is not None and fv.num_shards < 1:
        raise UserError(f"--num_shards must be >= 1, got {fv.num_shards}")
    if fv.read_threads < 1:
        raise UserError(f"--read_threads must be >= 1, got {fv.read_threads}")
    start = time.perf_counter()

    # Check the input and output first: a wrong path should fail before a VAE download.
    source = data.ImageFolderSource(folder, fv.image_size)
    check_latents_output(out_path, fv.overwrite)
    from skipdit_jax.encoders.vae import load_vae

    config, vae_params = load_vae(fv.vae)
    f = config.downsample_factor
    if fv.image_size % f:
        raise UserError(f"--image_size {fv.image_size} is not a multiple of the VAE's downsampling factor {f}")
    latent_shape = (fv.image_size // f, fv.image_size // f, config.latent_channels)

    devices = jax.local_devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    # Every device gets the same number of rows: round the batch up to a multiple of them.
    batch_size = math.ceil(fv.batch_size / len(devices)) * len(devices)
    encode, params, batch_sharding = _build_encoder(vae_params, config, fv.flip, mesh)

    n = len(source)
    record_bytes = 4 * math.prod(latent_shape) * (2 if fv.flip else 1)
    num_shards = fv.num_shards or max(1, math.ceil(n * record_bytes / _SHARD_TARGET_BYTES))
    # Grain reads, crops and batches on host threads while the devices encode; the padding
    # rows of the last batch are zeros whose latents are dropped below.
    batches = (
        grain.MapDataset.source(source)
        .batch(batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size))
        .to_iter_dataset(grain.ReadOptions(num_threads=fv.read_threads, prefetch_buffer_size=2 * fv.read_threads))
    )
    key = jax.random.key(fv.seed)

    def records():
        def emit(pending):
            (latents, flipped), labels, valid = pending
            latents = np.asarray(latents)[:valid]
            flipped = None if flipped is None else np.asarray(flipped)[:valid]
            for j in range(valid):
                yield {
                    "latent": latents[j],
                    "label": int(labels[j]),
                    **({"latent_flipped": flipped[j]} if flipped is not None else {}),
                }
            bar.update(valid)

        pending = None
        with tqdm(total=n, desc="encoding", unit="img") as bar:
            for i, batch in enumerate(batches):
                valid = min(batch_size, n - i * batch_size)
                images = jax.device_put(batch["image"], batch_sharding)
                # Dispatch batch i before fetching batch i-1, so the devices never wait on
                # the host's copy-out and writing.
                current = (encode(params, images, jax.random.fold_in(key, i)), batch["label"], valid)
                if pending is not None:
                    yield from emit(pending)
                pending = current
            if pending is not None:
                yield from emit(pending)

    meta = data.write_latents(
        out_path,
        records(),
        num_shards,
        overwrite=fv.overwrite,
        metadata={
            "source": str(source.root),
            "classes": source.classes,
            "num_classes": len(source.classes),
            "image_size": fv.image_size,
            "vae": fv.vae,
            "scaling_factor": config.scaling_factor,
            "shift_factor": config.shift_factor,
            "seed": fv.seed,
        },
    )
    h, w, c = latent_shape
    flipped = " (+ flipped)" if fv.flip else ""
    print(
        f"extracted {meta['count']} latents {h}x{w}x{c}{flipped} of {len(source.classes)} classes from {folder} -> "
        f"{out_path} ({num_shards} shard(s), batch {batch_size} on {len(devices)} device(s), "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return 0
