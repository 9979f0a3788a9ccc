"""Class-conditional Skip-DiT on the 5,000 embedded MNIST digits: the embedded default and
the settings of `skipdit demo`.

    skipdit train --config configs/mnist_skipdit.py --workdir runs/mnist_skipdit
    skipdit demo                       # the same settings, plus classifier scoring and cache timings

Produces WORKDIR/metrics.jsonl, TensorBoard events, Orbax checkpoints and EMA sample grids
(Skip-Cache N=2) under WORKDIR/samples/. `get_config("dit")` is the same model without long
skips (configs/mnist_dit.py).

Why these settings (measured on 2 CPU cores; see BENCHMARKS.md):
  * 16x16 digits (anti-aliased resize) with patch 2: 64 tokens, and at 16x16 the digits
    are still clearly digits, while every step costs a quarter of 32x32 at patch 2.
  * Deep and narrow (depth 12, width 96): Skip-Cache skips the middle 8 of 12 blocks with
    k=2, so its savings show even though embedding, head and DDIM update are fixed costs.
  * eps-MSE only (no learned sigma): DDIM does not use the variance, and the vb term
    slows early training.
  * lr 1e-3 with warmup and cosine decay, EMA 0.999: a short run needs a high peak and
    an EMA that forgets the first hundreds of steps.
  * DDIM-50 with x0 clipped to the pixel range [-1, 1] and guidance 2: clipping removes
    the speckle of unclipped pixel-space DDIM; strong guidance over-saturates strokes.
"""

from skipdit_jax.train_config import default_config, finalize


def get_config(arg: str | None = None):
    c = default_config()
    c.model.update(depth=12, hidden_size=128, num_heads=4, patch_size=4, long_skip=arg != "dit", learn_sigma=False, scan_unroll=0)
    c.data.update(name="mnist", image_size=16, num_classes=10, mnist_resize="resize")
    c.train.update(steps=4500, global_batch_size=64, log_every=50, ema_decay=0.999, ema_warmup=True, min_snr_gamma=5.0)
    c.optimizer.update(lr=1e-3, warmup_steps=200, decay="cosine", end_lr_factor=0.05)
    c.checkpoint.update(every=500, keep=2)
    c.sample.update(every=1000, sampler="ddim", num_steps=50, cfg_scale=4.0, cache_interval=2, shallow_blocks=2, clip_denoised=True)
    c.demo.update(samples_per_class=10, reserve_seconds=150.0)
    return finalize(c)
