"""Skip-DiT-XL/2 on ImageNet 256x256 VAE latents: the official class-to-image recipe.

    skipdit extract-latents /data/imagenet/train /data/in256-latents --vae hf://stabilityai/sd-vae-ft-ema --image_size 256
    skipdit train --config configs/imagenet256_skipdit_xl2.py --workdir gs://BUCKET/skipdit-xl2 \
        --config.data.path=/data/in256-latents

AdamW lr 1e-4 constant, weight decay 0, betas (0.9, 0.999), no clipping, global batch 256,
EMA 0.9999, label dropout 0.1, hybrid loss, t ~ U{0..999}, random horizontal flips (the
flipped latents are pre-extracted). The paper reports FID-50K (DDPM-250, no guidance) of
about 13.5 at 400k steps and about 9.1 at 1.6M, where DiT-XL/2 needs about 7M steps for 9.5.
Use `--config.mesh.fsdp=-1` on pods whose per-device memory cannot hold a replica of the
parameters plus AdamW state (about 11 GB in float32).
`get_config("dit")` is the same run without long skips (configs/imagenet256_dit_xl2.py).
"""

from skipdit_jax.train_config import default_config, finalize


def get_config(arg: str | None = None):
    c = default_config()
    c.model.update(depth=28, hidden_size=1152, num_heads=16, patch_size=2, long_skip=arg != "dit", learn_sigma=True)
    c.data.update(name="latents", path="", image_size=256, num_classes=1000, flip=True)
    c.train.update(steps=7_000_000 if arg == "dit" else 2_700_000, global_batch_size=256, log_every=100, ema_decay=0.9999)
    c.optimizer.update(lr=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=0.0)
    c.checkpoint.update(every=50_000, keep=3)
    c.mesh.update(data=-1, fsdp=1)
    c.sample.update(every=50_000, num_per_class=1, sampler="ddpm", num_steps=250, cfg_scale=4.0, cache_interval=2, shallow_blocks=4, clip_denoised=False)
    return finalize(c)
