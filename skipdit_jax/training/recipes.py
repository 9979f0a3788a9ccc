"""The official class-to-image training recipe (DiT-XL/2 and Skip-DiT-XL/2 on ImageNet
256x256 VAE latents), shared by `configs/imagenet256_skipdit_xl2.py` and
`configs/imagenet256_dit_xl2.py`."""

from skipdit_jax.training.config import default_config, finalize


def imagenet256_xl2(arg: str | None = None):
    """`arg="dit"`: DiT-XL/2 (no long skips, the DiT paper's 7M steps); else Skip-DiT-XL/2."""
    c = default_config()
    c.model.update(depth=28, hidden_size=1152, num_heads=16, patch_size=2, long_skip=arg != "dit", learn_sigma=True)
    c.data.update(name="latents", path="", image_size=256, num_classes=1000, flip=True)
    c.train.update(steps=7_000_000 if arg == "dit" else 2_700_000, global_batch_size=256, log_every=100, ema_decay=0.9999)
    c.optimizer.update(lr=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=0.0)
    c.checkpoint.update(every=50_000, keep=3)
    c.mesh.update(data=-1, fsdp=1)
    c.sample.update(every=50_000, num_per_class=1, sampler="ddpm", num_steps=250, cfg_scale=4.0, cache_interval=2, shallow_blocks=4, clip_denoised=False)
    return finalize(c)
