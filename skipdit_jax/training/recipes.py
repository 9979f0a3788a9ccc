"""The official class-to-image training recipe (DiT-XL/2 and Skip-DiT-XL/2 on ImageNet
256x256 VAE latents), shared by `configs/imagenet256_skipdit_xl2.py` and
`configs/imagenet256_dit_xl2.py`, with the paper's evaluation schedule."""

from skipdit_jax.training.config import default_config, finalize

# ADM's ImageNet 256x256 reference batch (10K images, precomputed statistics): download
# https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
# (to a bucket on pods) and pass it as --config.evals.fid.ref=...
REF_BATCH = "VIRTUAL_imagenet256_labeled.npz"
SD_VAE_EMA = "hf://stabilityai/sd-vae-ft-ema"


def imagenet256_xl2(arg: str | None = None):
    """`arg="dit"`: DiT-XL/2 (no long skips, the DiT paper's 7M steps); else Skip-DiT-XL/2.

    Evaluations: `evals.fid`, FID-10K every 50K steps (DDPM-250, no guidance, sd-vae-ft-ema
    decode, from the EMA weights), the paper's training curve; its reference is ADM's
    batch, REF_BATCH in the working directory unless `--config.evals.fid.ref=gs://...`
    says where (`--config.evals.fid.every=0` turns it off). `evals.grid`: a guided
    preview grid at the same interval."""
    c = default_config()
    c.model.update(depth=28, hidden_size=1152, num_heads=16, patch_size=2, long_skip=arg != "dit", learn_sigma=True)
    c.data.update(name="latents", path="", image_size=256, num_classes=1000, flip=True)
    c.train.update(steps=7_000_000 if arg == "dit" else 2_700_000, global_batch_size=256, log_every=100, ema_decay=0.9999)
    c.optimizer.update(lr=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=0.0)
    c.checkpoint.update(every=50_000, keep=3)
    c.mesh.update(data=-1, fsdp=1)
    # Default sampler settings of the evaluators: the official sampling (DDPM-250, guidance
    # 4 for the preview, Skip-Cache N=2 with 4 shallow blocks; no x0 clipping in latent space).
    c.sample.update(num_per_class=1, sampler="ddpm", num_steps=250, cfg_scale=4.0, cache_interval=2, shallow_blocks=4, clip_denoised=False, vae=SD_VAE_EMA)
    c.evals.grid.every = 50_000
    # The paper's curve: FID vs training steps, without guidance; 10K samples keep an
    # evaluation to ~1/5 of a FID-50K (the official development setting: 10K samples, cfg 1).
    c.evals.fid = dict(
        type="fid", every=50_000, num_samples=10_000, ref=REF_BATCH, inception="", batch_size=256, sampler="ddpm", num_steps=250,
        cfg_scale=1.0, cfg_channels=3, cache="", vae=SD_VAE_EMA, metrics="fid", seed=0,
    )
    return finalize(c)
