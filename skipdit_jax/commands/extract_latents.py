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

With --video, FOLDER is a folder of videos (`skipdit_jax.data.VideoFolderSource`: video
files or frame folders, ROOT/CLASS/VIDEO with --classes, else every video, label 0). Each
video gives --clips_per_video records: a clip of --num_frames frames --frame_interval apart
(the official TemporalRandomCrop, its start drawn from numpy's default_rng((seed, video,
clip))), resized by --video_resize to --image_size, and every frame encoded: a record holds
the latents (F, h, w, 4) and, with --flip, those of the mirrored clip. --batch_size counts
frames (a batch holds batch_size // num_frames clips, at least one). latents.json adds the
clip settings and "labels" (the label of every record), which joint image-video training
uses to draw images of a video's own class. The temporal crop of a record is fixed at
extraction: extract more clips per video for more variety.

Text-to-video: --captions FILE (JSON or CSV, video name -> caption; see
`skipdit_jax.data.text_video.read_captions`) with --t5 SPEC --tokenizer DIR adds each clip's
caption encoded by T5 (--text_len tokens, padded) to its record: "text_emb" (cut after the
last real token) and "text_mask"; the empty prompt's encoding goes to null_text.npz and
latents.json adds text_len, text_dim and the captions. `skipdit_jax.data.text_video.
TextLatentSource` reads them back.
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

USAGE = (
    "IMAGE_FOLDER OUT_PATH --vae SPEC [--image_size 256] [--batch_size 32] [--flip=true] [--seed 0] [--num_shards N]\n"
    "       [--overwrite]\n"
    "       VIDEO_FOLDER OUT_PATH --video --vae SPEC [--num_frames 16] [--frame_interval 3] [--video_resize center_crop]\n"
    "       [--frame_sampling linspace] [--clips_per_video 1] [--classes=true] [--image_size 256] [--batch_size 32] [--flip=true]\n"
    "       [--captions FILE --t5 SPEC --tokenizer DIR [--text_len 120]]"
)

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
    flags.DEFINE_bool("video", False, "FOLDER holds videos: write clip latents (F, h, w, 4)", flag_values=fv)
    flags.DEFINE_integer("num_frames", 16, "--video: frames per clip", flag_values=fv)
    flags.DEFINE_integer("frame_interval", 3, "--video: frames between clip frames", flag_values=fv)
    flags.DEFINE_enum(
        "video_resize", "center_crop", ["center_crop", "center_crop_resize"],
        "--video: UCFCenterCropVideo or CenterCropResizeVideo", flag_values=fv,
    )
    flags.DEFINE_enum(
        "frame_sampling", "linspace", ["linspace", "stride"], "--video: clip frame indices (skipdit_jax.data.video_sources)",
        flag_values=fv,
    )
    flags.DEFINE_integer("clips_per_video", 1, "--video: random clips (records) per video", flag_values=fv)
    flags.DEFINE_bool("classes", True, "--video: class folders ROOT/CLASS/VIDEO (false: unconditional)", flag_values=fv)
    flags.DEFINE_string("captions", None, "--video: JSON/CSV file of video name -> caption (text-to-video)", flag_values=fv)
    flags.DEFINE_string("t5", None, "--captions: the T5 encoder (folder or hf:// spec)", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "--captions: the T5 tokenizer folder", flag_values=fv)
    flags.DEFINE_integer("text_len", 120, "--captions: tokens per caption (padded / truncated)", flag_values=fv)


def _build_encoder(vae_params, config, flip: bool, mesh):
    """A jitted (params, images, key) -> (latents, flipped latents or None), batch-sharded.
    Images (B, H, W, C), or clips (B, F, H, W, C) whose frames are encoded as images."""
    from skipdit_jax.encoders.vae import encode_to_latents

    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def encode_frames(params, x, key):
        lead = x.shape[:-3]
        z = encode_to_latents(params, config, x.reshape(-1, *x.shape[-3:]), key)
        return z.reshape(*lead, *z.shape[1:])

    def encode(params, images, key):
        key_plain, key_flip = jax.random.split(key)
        latents = encode_frames(params, images, key_plain)
        flipped = encode_frames(params, images[..., ::-1, :], key_flip) if flip else None  # the W axis
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
    for name in ("num_frames", "frame_interval", "clips_per_video"):
        if fv[name].value < 1:
            raise UserError(f"--{name} must be >= 1, got {fv[name].value}")
    if fv.captions and not fv.video:
        raise UserError("--captions needs --video (captions belong to videos)")
    if fv.captions and (not fv.t5 or not fv.tokenizer):
        raise UserError("--captions needs --t5 SPEC and --tokenizer DIR to encode them")
    if fv.captions and fv.text_len < 1:
        raise UserError(f"--text_len must be >= 1, got {fv.text_len}")
    start = time.perf_counter()

    # Check the input and output first: a wrong path should fail before a VAE download.
    captions = None
    if fv.video:
        videos = data.VideoFolderSource(
            folder, image_size=fv.image_size, num_frames=fv.num_frames, frame_interval=fv.frame_interval,
            resize=fv.video_resize, frame_sampling=fv.frame_sampling, classes=fv.classes,
        )
        _check_video_lengths(videos)
        source = _ClipRecords(videos, fv.clips_per_video, fv.seed)
        per_record, unit = fv.num_frames, "clip"
        if fv.captions:
            captions = _record_captions(videos, fv.captions, fv.clips_per_video)
    else:
        source = data.ImageFolderSource(folder, fv.image_size)
        per_record, unit = 1, "img"
    check_latents_output(out_path, fv.overwrite)
    from skipdit_jax.encoders.vae import load_vae

    config, vae_params = load_vae(fv.vae)
    f = config.downsample_factor
    if fv.image_size % f:
        raise UserError(f"--image_size {fv.image_size} is not a multiple of the VAE's downsampling factor {f}")
    latent_shape = (fv.num_frames,) * bool(fv.video) + (fv.image_size // f, fv.image_size // f, config.latent_channels)
    encode_text, extra_files, text_meta = None, None, {}
    if captions is not None:
        from skipdit_jax.data import text_video

        encode_text = text_video.t5_encode_fn(fv.t5, fv.tokenizer, fv.text_len)
        null = encode_text([""])
        null_emb, null_mask = null["text_emb"][0], null["text_mask"][0]
        extra_files = {text_video.NULL_TEXT_FILE: text_video.encode_null_text(null_emb, null_mask)}
        text_meta = dict(text_len=int(null_emb.shape[0]), text_dim=int(null_emb.shape[1]), t5=fv.t5, captions=captions)

    devices = jax.local_devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    # Every device gets the same number of rows: round the batch up to a multiple of them.
    rows = max(1, fv.batch_size // per_record)
    batch_size = math.ceil(rows / len(devices)) * len(devices)
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
            (latents, flipped), labels, valid, first = pending
            latents = np.asarray(latents)[:valid]
            flipped = None if flipped is None else np.asarray(flipped)[:valid]
            texts = None
            if encode_text is not None:
                from skipdit_jax.data.text_video import trim_text

                texts = encode_text(captions[first : first + valid])
            for j in range(valid):
                extras = {}
                if texts is not None:
                    emb, mask = trim_text(texts["text_emb"][j], texts["text_mask"][j])
                    extras = {"extras": {"text_emb": emb, "text_mask": mask}}
                yield {
                    "latent": latents[j],
                    "label": int(labels[j]),
                    **({"latent_flipped": flipped[j]} if flipped is not None else {}),
                    **extras,
                }
            bar.update(valid)

        pending = None
        with tqdm(total=n, desc="encoding", unit=unit) as bar:
            for i, batch in enumerate(batches):
                valid = min(batch_size, n - i * batch_size)
                images = jax.device_put(batch["image"], batch_sharding)
                # Dispatch batch i before fetching batch i-1, so the devices never wait on
                # the host's copy-out and writing.
                current = (encode(params, images, jax.random.fold_in(key, i)), batch["label"], valid, i * batch_size)
                if pending is not None:
                    yield from emit(pending)
                pending = current
            if pending is not None:
                yield from emit(pending)

    metadata = {
        "source": str(source.root),
        "classes": source.classes,
        "num_classes": len(source.classes),
        "image_size": fv.image_size,
        "vae": fv.vae,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "seed": fv.seed,
    }
    if fv.video:
        metadata.update(
            video=True, num_frames=fv.num_frames, frame_interval=fv.frame_interval, video_resize=fv.video_resize,
            frame_sampling=fv.frame_sampling, clips_per_video=fv.clips_per_video, labels=source.labels.tolist(),
        )
    metadata.update(text_meta)
    meta = data.write_latents(out_path, records(), num_shards, overwrite=fv.overwrite, metadata=metadata, extra_files=extra_files)
    shape = "x".join(str(d) for d in latent_shape)
    flipped = " (+ flipped)" if fv.flip else ""
    print(
        f"extracted {meta['count']} latents {shape}{flipped} of {len(source.classes)} classes from {folder} -> "
        f"{out_path} ({num_shards} shard(s), batch {batch_size} on {len(devices)} device(s), "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return 0


def _check_video_lengths(videos) -> None:
    """Every video has a clip's frames (a cheap header read each): fail before the VAE loads."""
    from skipdit_jax.videos import video_num_frames

    short = [(p, n) for p, n in ((p, video_num_frames(p)) for p, _ in videos.videos) if n < videos.num_frames]
    if short:
        path, n = short[0]
        need = videos.num_frames
        raise UserError(f"{len(short)} video(s) have fewer than the {need} frames of a clip (--num_frames), e.g. {path} ({n})")


def _record_captions(videos, captions_file: str, clips: int) -> list[str]:
    """The caption of every record (record k is a clip of video k // clips), or UserError
    naming the first video the file has no caption for."""
    from skipdit_jax.data.text_video import caption_for, read_captions

    table = read_captions(captions_file)
    per_video = [caption_for(p, videos.root, table) for p, _ in videos.videos]
    missing = [str(p) for (p, _), c in zip(videos.videos, per_video) if c is None]
    if missing:
        raise UserError(f"{captions_file} has no caption for {len(missing)} video(s), e.g. {missing[0]}")
    return [c for c in per_video for _ in range(clips)]


class _ClipRecords:
    """Record k = clip k % clips of video k // clips of a `VideoFolderSource`, as
    {"image": (F, H, W, 3), "label"}; the clip's start from default_rng((seed, video, clip))."""

    def __init__(self, videos, clips: int, seed: int):
        self.videos, self.clips, self.seed = videos, clips, seed
        self.root, self.classes = videos.root, videos.classes

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(self.videos.labels, self.clips)

    def __len__(self) -> int:
        return len(self.videos) * self.clips

    def __getitem__(self, k):
        i, c = divmod(int(k), self.clips)
        clip = self.videos.clip(i, np.random.default_rng((self.seed, i, c)))
        return {"image": clip, "label": np.int32(self.videos.videos[i][1])}
