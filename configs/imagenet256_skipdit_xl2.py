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

from skipdit_jax.training.recipes import imagenet256_xl2


def get_config(arg: str | None = None):
    return imagenet256_xl2(arg)
