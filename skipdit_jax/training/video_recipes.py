"""The official class-to-video training recipe (Latte-XL/2-skip, `train_with_img.py` with
`configs/*/*_img_train.yaml` of the Skip-DiT code), shared by configs/latte_{ucf101,sky,
taichi,ffs}.py and configs/finetune_latte_to_skip.py.

What the official code does, and what these configs set:
  - model LatteIMG-skip = Latte-XL/2-skip (28 blocks = 14 pairs, width 1152, 16 heads,
    patch 2, learned sigma, xavier-initialised skip fusions); 16 frames of 32x32x4 latents
    (256x256 videos through sd-vae-ft-mse), plus 8 joint images per video;
  - AdamW with lr hard-coded to 1e-4 (the yaml's learning_rate, e.g. 5e-5 for UCF-101, is
    ignored), weight decay 0, betas (0.9, 0.999); diffusers' "linear" schedule: linear
    warm-up (300 steps UCF-101, 0 others) then linear decay to 0 at max_train_steps
    (100K UCF-101, 1M others);
  - gradient-norm clipping at 0.1 only from start_clip_iter on (UCF-101 10K, Sky 20K,
    Taichi / FaceForensics 500K);
  - global batch 4 per GPU x 8 GPUs = 32, fp32, EMA 0.9999, class dropout 0.1 (UCF-101),
    seed 3407; checkpoints every 3K (UCF-101) / 10K steps;
  - data: TemporalRandomCrop(16 x 3) clips, horizontal flips (not Sky), UCFCenterCropVideo
    (UCF-101, FaceForensics) or CenterCropResizeVideo (Sky; Taichi's frames are already
    256x256, for which it is the identity).
Differences by construction: training reads pre-extracted latents, so a record's temporal
crop is drawn once at extraction (extract several clips per video for variety), and the
flip picks the pre-extracted latents of the mirrored clip.
"""

from __future__ import annotations

from skipdit_jax.training.config import default_config, finalize

SD_VAE_MSE = "hf://stabilityai/sd-vae-ft-mse"

# dataset -> (classes, max_train_steps, warm-up, start_clip_iter, flip, resize, frame sampling, checkpoint every, log every)
C2V_DATASETS = {
    "ucf101": (101, 100_000, 300, 10_000, True, "center_crop", "linspace", 3_000, 50),
    "sky": (0, 1_000_000, 0, 20_000, False, "center_crop_resize", "stride", 10_000, 50),
    "taichi": (0, 1_000_000, 0, 500_000, True, "center_crop_resize", "stride", 10_000, 50),
    "ffs": (0, 1_000_000, 0, 500_000, True, "center_crop", "linspace", 10_000, 100),
}


def latte_c2v(dataset: str, arg: str | None = None, *, lock: bool = True):
    """The c2v recipe for `dataset` (ucf101, sky, taichi, ffs). `arg="latte"`: the same
    run with vanilla Latte-XL/2 (no long skips); otherwise Latte-XL/2-skip. `lock=False`
    leaves the config open for a recipe built on it."""
    if dataset not in C2V_DATASETS:
        raise ValueError(f"unknown c2v dataset {dataset!r}; expected one of {', '.join(C2V_DATASETS)}")
    if arg not in (None, "", "skip", "latte"):
        raise ValueError(f"the config argument is 'skip' (default) or 'latte' (no long skips), got {arg!r}")
    classes, steps, warmup, clip_after, flip, resize, sampling, ckpt_every, log_every = C2V_DATASETS[dataset]
    c = default_config()
    c.seed = 3407
    c.model.update(
        family="latte", depth=28, hidden_size=1152, num_heads=16, patch_size=2, mlp_ratio=4.0, long_skip=arg != "latte",
        learn_sigma=True, skip_init="xavier",
    )
    c.data.update(
        name="latents", path="", image_size=256, num_classes=classes, flip=flip, num_frames=16, frame_interval=3,
        images_per_video=8, video_resize=resize, frame_sampling=sampling,
    )
    c.train.update(steps=steps, global_batch_size=32, log_every=log_every, ema_decay=0.9999, label_dropout=0.1)
    c.optimizer.update(
        lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=warmup, decay="linear", end_lr_factor=0.0, grad_clip=0.1,
        clip_after_steps=clip_after,
    )
    c.checkpoint.update(every=ckpt_every, keep=3)
    c.mesh.update(data=-1, fsdp=1)
    # The official c2v sampling: DDPM-250, guidance 7 on all 4 channels (UCF-101) or none,
    # Skip-Cache N=2 with one shallow pair; no x0 clipping in latent space.
    c.sample.update(
        num_per_class=1, sampler="ddpm", num_steps=250, cfg_scale=7.0 if classes else 1.0, cache_interval=2, shallow_blocks=1,
        clip_denoised=False, vae=SD_VAE_MSE,
    )
    c.evals.grid.every = 0  # previews (animated GIFs) are opt-in: DDPM-250 on the XL model is slow
    return finalize(c) if lock else c
