"""Class-conditional Skip-DiT on the 5,000 embedded MNIST digits (pixel space, 32x32).

    skipdit train --config configs/mnist_skipdit.py --workdir runs/mnist_skipdit

Trains a depth-12, width-128 Skip-DiT (patch 4: 64 tokens) for 4,000 steps at batch 64 on
the 4,000-digit training split; writes WORKDIR/metrics.jsonl, TensorBoard events, EMA
sample grids (Skip-Cache N=2) every 1,000 steps under WORKDIR/samples/, and Orbax
checkpoints. Recognisable digits of the conditioned class appear within ~2,000 steps.
Variants: `get_config("dit")` switches the long skips off (configs/mnist_dit.py).
"""

from skipdit_jax.train_config import default_config, finalize


def get_config(arg: str | None = None):
    c = default_config()
    c.model.update(depth=12, hidden_size=128, num_heads=4, patch_size=4, long_skip=arg != "dit", learn_sigma=False)
    c.data.update(name="mnist", image_size=32, num_classes=10)
    c.train.update(steps=4000, global_batch_size=64, log_every=50, ema_decay=0.999)
    c.optimizer.update(lr=1e-3, warmup_steps=200, decay="cosine", end_lr_factor=0.05)
    c.checkpoint.update(every=1000, keep=2)
    c.sample.update(every=1000, sampler="ddim", num_steps=50, cfg_scale=2.0, cache_interval=2, shallow_blocks=2, clip_denoised=True)
    return finalize(c)
