"""Skip-DiT-XL/2 on ImageNet 256x256 VAE latents: the official class-to-image recipe.

    skipdit extract-latents /data/imagenet/train /data/in256-latents --vae hf://stabilityai/sd-vae-ft-ema --image_size 256
    skipdit train --config configs/imagenet256_skipdit_xl2.py --workdir gs://BUCKET/skipdit-xl2 \
        --config.data.path=/data/in256-latents --config.evals.fid.ref=gs://BUCKET/VIRTUAL_imagenet256_labeled.npz
    # on a pod, on every host: add --coordinator_address HOST:PORT --num_processes N --process_id I
    # (and --config.mesh.fsdp=-1 where a device cannot hold the parameters plus AdamW state, ~11 GB float32)

    # the final FID-50K of a checkpoint (official sampling: DDPM-250, guidance 1.5 on 3 channels):
    skipdit sample-many gs://BUCKET/skipdit-xl2 --preset fid50k --out gs://BUCKET/skipdit-xl2/fid50k
    skipdit evaluate gs://BUCKET/skipdit-xl2/fid50k/samples_50000x256x256x3.npz --ref VIRTUAL_imagenet256_labeled.npz

AdamW lr 1e-4 constant, weight decay 0, betas (0.9, 0.999), no clipping, global batch 256,
EMA 0.9999, label dropout 0.1, hybrid loss, t ~ U{0..999}, random horizontal flips (the
flipped latents are pre-extracted).

Evaluation schedule (`evals`, run on the EMA weights after each 50K-step checkpoint, logged
to metrics.jsonl as fid/fid and to TensorBoard; an evaluation cut short by preemption is
redone on resume): FID-10K (DDPM-250, no guidance, sd-vae-ft-ema decode) against ADM's
reference batch VIRTUAL_imagenet256_labeled.npz (https://openaipublic.blob.core.windows.net/
diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz), and a preview
grid. `skipdit plot-curves WORKDIR_SKIPDIT WORKDIR_DIT --metric fid/fid` draws the curves.

What to expect (the paper's FID-vs-steps figure, read off the plot, steps +-5%; FID-50K,
most likely without guidance, i.e. the numbers `--config.evals.fid.num_samples=50000`
measures in the loop): Skip-DiT-XL/2 13.46 at 400K steps, 10.13 at 800K, 9.07 at 1.6M
(8.37 at ~2.9M); DiT-XL/2 (configs/imagenet256_dit_xl2.py) 19.47 at 400K and 9.49 at ~7M,
hence the paper's 4.4x fewer training steps. The in-loop FID-10K reads a few points above
FID-50K (FID is biased upwards for fewer samples): compare curves with each other, and a
final checkpoint with the two commands above (guided FID-50K, the setting of the paper's
tables and of DiT's 2.27). `get_config("dit")` is the same run without long skips.
"""

from skipdit_jax.training.recipes import imagenet256_xl2


def get_config(arg: str | None = None):
    return imagenet256_xl2(arg)
