"""DiT-XL/2 on ImageNet 256x256 VAE latents (the DiT baseline of the Skip-DiT paper).

    skipdit train --config configs/imagenet256_dit_xl2.py --workdir gs://BUCKET/dit-xl2 \
        --config.data.path=/data/in256-latents --config.evals.fid.ref=gs://BUCKET/VIRTUAL_imagenet256_labeled.npz

    # the final FID-50K of a checkpoint (official sampling: DDPM-250, guidance 1.5 on 3 channels):
    skipdit sample-many gs://BUCKET/dit-xl2 --preset fid50k --out gs://BUCKET/dit-xl2/fid50k
    skipdit evaluate gs://BUCKET/dit-xl2/fid50k/samples_50000x256x256x3.npz --ref VIRTUAL_imagenet256_labeled.npz

Identical to configs/imagenet256_skipdit_xl2.py (see its docstring for the pod flags and the
evaluation schedule: FID-10K without guidance every 50K steps) but for `model.long_skip=False`
and the DiT paper's 7M steps. Expected, from the Skip-DiT paper's figure (FID-50K, most
likely without guidance; steps +-5%): 19.47 at 400K steps, 10.67 at ~2.35M, 9.49 at ~7M
(DiT's own paper: 19.5 at 400K without guidance).
"""

from skipdit_jax.training.recipes import imagenet256_xl2


def get_config(arg: str | None = None):
    return imagenet256_xl2("dit")
