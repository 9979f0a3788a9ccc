"""DiT-XL/2 on ImageNet 256x256 VAE latents (the DiT baseline of the Skip-DiT paper).

    skipdit train --config configs/imagenet256_dit_xl2.py --workdir gs://BUCKET/dit-xl2 \
        --config.data.path=/data/in256-latents

Identical to configs/imagenet256_skipdit_xl2.py but for `model.long_skip=False` and the
DiT paper's 7M steps (FID-50K about 19.5 at 400k steps and 9.6 at 7M without guidance).
"""

from skipdit_jax.training.recipes import imagenet256_xl2


def get_config(arg: str | None = None):
    return imagenet256_xl2("dit")
