"""The training config schema: defaults every `configs/*.py` starts from, and validation.

Configs are `ml_collections.ConfigDict`s, locked after construction so a mistyped
`--config.train.stpes=10` is an error instead of a silently ignored key.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from skipdit_jax import paths
from skipdit_jax.errors import ConfigError
from skipdit_jax.models.families import config_from_dict, family_of, get_family

VAE_FACTOR = 8  # SD-VAE downsampling: 256x256 images -> 32x32x4 latents
# Channels of the pixel sources (others: RGB).
DATA_CHANNELS = {"mnist": 1, "moving_digits": 1, "text_moving_digits": 1}
DATA_NAMES = ("mnist", "folder", "latents", "video_folder", "moving_digits", "text_moving_digits")
VIDEO_DATA = ("video_folder", "moving_digits", "text_moving_digits")
# Families whose samples are videos, and those conditioned on text (which train on captioned
# data: text_moving_digits, or latents extracted with --captions).
VIDEO_FAMILIES = ("latte", "latte_t2v", "latte_t2v_joint")
TEXT_FAMILIES = ("latte_t2v", "latte_t2v_joint")
TEXT_DATA = ("text_moving_digits", "latents")
VIDEO_RESIZE = ("center_crop", "center_crop_resize")
FRAME_SAMPLING = ("linspace", "stride")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model: `family` names the model family (skipdit_jax.models.families); the other keys are
    # that family's config fields, except the input shape and classes, which come from the data.
    c.model = ml_collections.ConfigDict(
        dict(
            family="dit",
            depth=12,
            hidden_size=384,
            num_heads=6,
            patch_size=2,
            mlp_ratio=4.0,
            long_skip=True,
            learn_sigma=True,
            skip_init="torch_default",
            dtype="float32",
            remat_policy="none",  # or a jax.checkpoint_policies name, e.g. "nothing_saveable"
            scan_unroll=1,
            attention_impl=ml_collections.FieldReference(None, field_type=str),
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            name="mnist",  # mnist | folder | latents | video_folder | moving_digits
            path="",  # image/video folder root, or ArrayRecord latents path/glob
            image_size=32,  # side of the square images (pixels; latents are image_size // 8)
            num_classes=10,  # video_folder: > 0 = class subfolders (ROOT/CLASS/VIDEO), 0 = unconditional
            flip=False,  # horizontal flip with probability 1/2 (videos: the whole clip, W axis)
            mnist_resize="pad",  # 28x28 digits -> image_size by zero padding ("pad") or resizing
            # Video data (model.family="latte"): clips of num_frames frames frame_interval apart
            # (the official TemporalRandomCrop of num_frames * frame_interval frames), plus
            # images_per_video single frames from other videos (joint image-video training;
            # for "latte_t2v" each with its own video's caption).
            num_frames=16,
            frame_interval=3,
            images_per_video=0,
            # moving_digits: the digit's side (0: the default for image_size) and the grid its
            # start and speed snap to (1: any pixel; the patch size: patch-aligned motion).
            digit_size=0,
            motion_grid=1,
            # "center_crop": scale the short side to image_size, centre crop (UCFCenterCropVideo,
            # UCF-101 / FaceForensics); "center_crop_resize": centre square, then resize
            # (CenterCropResizeVideo, Sky / Taichi).
            video_resize="center_crop",
            # "linspace": num_frames indices spread evenly over the crop (the video-file datasets);
            # "stride": every frame_interval-th frame from the crop's start (the frame-folder
            # datasets Sky / Taichi).
            frame_sampling="linspace",
            # Text-to-video data: tokens per caption (model.text_len follows it), and for
            # text_moving_digits feeding a model that takes embeddings, the T5 encoder
            # (folder or hf:// spec) and its tokenizer folder that encode the captions once.
            text_len=120,
            t5="",
            tokenizer="",
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            global_batch_size=32,
            # Micro-batches per step: the global batch is split into this many equal parts
            # whose gradients are summed (float32) before the one optimizer/EMA update, so
            # a batch too big for memory trains exactly as if it fitted.
            grad_accum_steps=1,
            log_every=50,
            label_dropout=0.1,
            ema_decay=0.9999,
            ema_warmup=False,  # decay min(ema_decay, (1+n)/(10+n)): for short runs; DiT uses none
            min_snr_gamma=ml_collections.FieldReference(None, field_type=float),  # Min-SNR-gamma eps-MSE weighting; DiT uses none
            grad_skip_threshold=ml_collections.FieldReference(None, field_type=float),
            trainable="all",  # all | skip_only (stage 1 of the two-stage fine-tune)
            init_from="",  # model dir / official checkpoint to start from (fresh skip modules if absent)
            init_num_heads=ml_collections.FieldReference(None, field_type=int),
            # init_from a training workdir: start from its EMA weights instead of its raw ones
            # (the t2v script's `pretrained` loads a checkpoint's "ema" when it has one).
            init_use_ema=False,
            max_seconds=ml_collections.FieldReference(None, field_type=float),  # wall-clock budget
            # jax.profiler trace of `profile_steps` steps (0 = off) into WORKDIR/profile (for
            # TensorBoard's profile plugin), starting after `profile_after` steps of each
            # (re)started run, so compilation and warm-up stay out of it. Process 0 only.
            profile_steps=0,
            profile_after=5,
        )
    )

    c.optimizer = ml_collections.ConfigDict(
        dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, decay="constant", end_lr_factor=0.0, grad_clip=0.0)
    )
    # Global-norm clipping at grad_clip (0 = off) only from this many updates on (0 = always):
    # Latte's c2v start_clip_iter.
    c.optimizer.clip_after_steps = 0

    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))

    # Devices along each mesh axis (-1 = the rest). Tensors under min_shard_size elements
    # are replicated rather than FSDP-sharded.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))

    # The default sampler settings of the in-loop evaluators (each may override any of
    # them). `every` is the old spelling of `evals.grid.every` (None = unset; still honoured).
    c.sample = ml_collections.ConfigDict(
        dict(
            every=ml_collections.FieldReference(None, field_type=int),
            num_per_class=1, batch_size=16, sampler="ddim", num_steps=50, cfg_scale=4.0, cache_interval=2, shallow_blocks=1,
            clip_denoised=True, vae="",
        )
    )
    # In-loop evaluators as data (skipdit_jax/training/evaluators.py): name -> dict(type, every
    # (steps, 0 = off), the type's keys, overrides of `sample`). Types: grid, fid, classifier_fid.
    # Each runs after the checkpoint of its step is saved; an interrupted one reruns on resume.
    c.evals = ml_collections.ConfigDict(dict(grid=dict(type="grid", every=0)))
    # `skipdit demo` only: samples per class, and seconds kept back from the training budget
    # for the classifier and the five timed sampling runs.
    c.demo = ml_collections.ConfigDict(dict(samples_per_class=10, reserve_seconds=150.0))
    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    return config


def model_config(config: ml_collections.ConfigDict):
    """The model config a training config describes: `model.family` picks the family's
    config class; the input shape and class count come from the data."""
    d = config.data
    if d.name == "latents":
        if d.image_size % VAE_FACTOR:
            raise ConfigError(f"data.image_size {d.image_size} must be divisible by {VAE_FACTOR} for VAE latents")
        input_size, channels = d.image_size // VAE_FACTOR, 4
    else:
        input_size, channels = d.image_size, DATA_CHANNELS.get(d.name, 3)
    fields = dict(config.model.to_dict(), input_size=input_size, in_channels=channels, num_classes=d.num_classes)
    family = fields.get("family")
    if family in VIDEO_FAMILIES:
        # A video model: its frame count and joint images come from the data.
        fields["num_frames"] = d.num_frames
        if d.images_per_video:
            fields["joint_images"] = d.images_per_video
    if family in TEXT_FAMILIES:
        # A text model: no classes; its caption length comes from the data.
        del fields["num_classes"]
        fields["text_len"] = d.text_len
        known = {f.name for f in dataclasses.fields(get_family(family).config_cls)} | {"family"}
        fields = {k: v for k, v in fields.items() if k in known or k in config.model}
    return config_from_dict(fields)  # "family" selects the config class


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1):
    """Every check that can fail on user input, before anything compiles."""
    mc = model_config(config)  # depth parity, patch divisibility, widths
    t = config.train
    for name in ("steps", "global_batch_size", "log_every", "grad_accum_steps"):
        if t[name] < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {t[name]}")
    for name in ("profile_steps", "profile_after"):
        if t[name] < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {t[name]}")
    if not 0 <= t.label_dropout < 1:
        raise ConfigError(f"train.label_dropout must be in [0, 1), got {t.label_dropout}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.min_snr_gamma is not None and not t.min_snr_gamma > 0:
        raise ConfigError(f"train.min_snr_gamma must be > 0 (or None), got {t.min_snr_gamma}")
    if t.trainable not in ("all", "skip_only"):
        raise ConfigError(f"train.trainable must be 'all' or 'skip_only', got {t.trainable!r}")
    if t.trainable == "skip_only" and not mc.long_skip:
        raise ConfigError("train.trainable='skip_only' needs model.long_skip=True")
    if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every and checkpoint.keep must be >= 1")
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if data == -1 and fsdp == -1:
        raise ConfigError("only one of mesh.data and mesh.fsdp may be -1")
    d = data if data != -1 else (num_devices // fsdp if fsdp > 0 else 0)
    f = fsdp if fsdp != -1 else (num_devices // data if data > 0 else 0)
    if d < 1 or f < 1 or d * f != num_devices:
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} does not match the {num_devices} devices")
    if t.global_batch_size % num_devices:
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by the {num_devices} data-parallel devices")
    if t.global_batch_size % (t.grad_accum_steps * num_devices):
        # Every micro-batch must still cover every device evenly.
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by train.grad_accum_steps {t.grad_accum_steps} "
            f"x {num_devices} devices"
        )
    if t.global_batch_size % process_count:
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by the {process_count} processes")
    dn, dd = config.data.name, config.data
    if dn not in DATA_NAMES:
        raise ConfigError(f"data.name must be one of {', '.join(DATA_NAMES)}, got {dn!r}")
    if dn in ("folder", "latents", "video_folder") and not dd.path:
        raise ConfigError(f"data.path is required for data.name={dn!r}")
    if dn in ("folder", "video_folder") and not paths.as_path(dd.path).is_dir():  # local or gs://
        raise ConfigError(f"data folder not found: {dd.path}")
    family = type(mc).family
    is_video, is_text = family in VIDEO_FAMILIES, family in TEXT_FAMILIES
    if dn in VIDEO_DATA and not is_video:
        raise ConfigError(f"data.name={dn!r} is video data: it needs a video model (model.family='latte')")
    if is_text and dn not in TEXT_DATA:
        raise ConfigError(f"model.family={family!r} is text-conditioned: it trains on text_moving_digits or latents with captions, got data.name={dn!r}")
    if is_video and dn not in VIDEO_DATA + ("latents",):
        raise ConfigError(f"model.family={family!r} trains on video_folder, moving_digits or latents data, got data.name={dn!r}")
    if dn == "text_moving_digits" and not is_text:
        raise ConfigError(f"data.name='text_moving_digits' (captions) needs a text model (model.family latte_t2v or latte_t2v_joint), got {family!r}")
    if dn == "text_moving_digits" and dd.flip:
        raise ConfigError("data.flip must be off for text_moving_digits: a mirrored clip would contradict its caption (left/right)")
    if dd.text_len < 1:
        raise ConfigError(f"data.text_len must be >= 1, got {dd.text_len}")
    for name in ("num_frames", "frame_interval"):
        if dd[name] < 1:
            raise ConfigError(f"data.{name} must be >= 1, got {dd[name]}")
    if dd.digit_size < 0 or dd.motion_grid < 1:
        raise ConfigError(f"data.digit_size must be >= 0 (0: default) and data.motion_grid >= 1, got {dd.digit_size} and {dd.motion_grid}")
    if dd.images_per_video < 0:
        raise ConfigError(f"data.images_per_video must be >= 0, got {dd.images_per_video}")
    if dd.images_per_video and not is_video:
        raise ConfigError(
            "data.images_per_video (joint image-video training) needs a video model (model.family='latte' or 'latte_t2v')"
        )
    if dd.images_per_video and family == "latte_t2v_joint":
        raise ConfigError(
            "data.images_per_video (joint images with their own captions) is not supported for "
            "model.family='latte_t2v_joint'; set it to 0"
        )
    if dd.video_resize not in VIDEO_RESIZE:
        raise ConfigError(f"data.video_resize must be one of {', '.join(VIDEO_RESIZE)}, got {dd.video_resize!r}")
    if dd.frame_sampling not in FRAME_SAMPLING:
        raise ConfigError(f"data.frame_sampling must be one of {', '.join(FRAME_SAMPLING)}, got {dd.frame_sampling!r}")
    if dn == "mnist" and config.data.num_classes != 10:
        raise ConfigError("MNIST has 10 classes: data.num_classes must be 10")
    if config.sample.every is not None and config.sample.every < 0:
        raise ConfigError("sample.every must be >= 0 (0 = never); better, set evals.grid.every")
    from skipdit_jax.training.evaluators import build_evaluators  # imports jax: only when validating

    build_evaluators(config, family_of(mc))  # unknown types/keys, missing references: one line each
    return mc
