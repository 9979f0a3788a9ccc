"""Class-conditional Skip-DiT on the 5,000 embedded MNIST digits: the embedded default and
the settings of `skipdit demo`. They live in the package so an installed (non-editable)
`skipdit demo` has them; `configs/mnist_skipdit.py` and `configs/mnist_dit.py` re-export
them for `skipdit train`.

    skipdit train --config configs/mnist_skipdit.py --workdir runs/mnist_skipdit
    skipdit demo                       # the same settings, plus classifier scoring and cache timings

Produces WORKDIR/metrics.jsonl, TensorBoard events, Orbax checkpoints and EMA sample grids
(Skip-Cache N=2, every 1,000 steps) under WORKDIR/samples/. `get_config("dit")` is the same
model without long skips (configs/mnist_dit.py).

Why these settings (measured on 2 CPU cores, 2026-11-27; see BENCHMARKS.md, "The demo"):
  * 16x16 digits (anti-aliased resize) with patch 4: 16 tokens. At 16x16 the digits are
    still clearly digits. Patch 2 (64 tokens, width 96) ran 2.6 steps/s and reached only
    33% class accuracy after 1,942 steps (12 min); patch 4 at width 128 runs ~6.5 steps/s
    (with logging and sample grids) and matched that accuracy within 3 minutes.
  * Deep and narrow (depth 12, width 128, 4 heads): with k=2 a cached step runs 4 of 12
    blocks, so Skip-Cache's savings show over the fixed costs (embedding, head, DDIM).
  * `scan_unroll=0`: unrolled block loops train ~1.35x faster on CPU (BENCHMARKS.md).
  * eps-MSE only (no learned sigma): DDIM does not use the variance. Min-SNR-5 weighting
    (`train.min_snr_gamma`) keeps the many easy low-noise steps from dominating a short run.
  * lr 1e-3, 200 warm-up steps, cosine to 5% over 4,500 steps (what 2 cores do in ~11 min).
  * EMA 0.999 *with warm-up* (`train.ema_warmup`): without it the EMA of a 2,000-step run
    still holds 0.999**2000 = 14% of the random initialisation; the first attempt's EMA
    samples were noise (7% class accuracy) while its raw weights gave 33%.
  * DDIM-50, x0 clipped to [-1, 1] (removes the speckle of unclipped pixel-space DDIM),
    guidance 4 (at 3 minutes of training: 34% vs 26% accuracy at guidance 2).
  * The classifier-FID curve (`CURVE_EVAL`, run by `skipdit demo` only): 6 evaluations of
    300 uncached guided DDIM-10 samples. Measured on 2 shared CPU cores (2026-11-29): one
    evaluation costs about as much as 18 training steps (3.5-5 s when steps ran at 4.5-5.5
    per second; the first adds ~4 s of compiling), so the 6 of a 4,500-step run add ~3%
    to the training time (6 evaluations over 1,500 steps: 82 s beside 974 s of training;
    a 15-minute demo on the loaded machine: 3 evaluations, 14.5 s, 2.2%).
Result: 4,500 steps in 663 s, class accuracy 1.00 full and with Skip-Cache N=2,3,4
(speedups 1.43x, 1.61x, 1.88x), held-out classifier accuracy 0.974; 705 s in all
(measured before the curve was added). On 2026-11-29, with the curve, the same machine ran
4.2 steps/s: 3,045 steps in the budget, class accuracy 0.94 (0.94 with N=2, 1.57x), classifier
FID 15.4, 8.9, 6.1, 5.3 at steps 750-3,000; 795 s in all.
"""

from skipdit_jax.training.config import default_config, finalize

# The demo's classifier-FID curve (an entry of config.evals): off here (`skipdit train` with
# this config needs no classifier); `skipdit demo` sets `every` and the classifier it trained.
# DDIM-10 on 300 samples (30 per class) in two batches, uncached, so that Skip-DiT and DiT
# curves come from the same sampler.
CURVE_EVAL = dict(type="classifier_fid", every=0, classifier="", num_samples=300, batch_size=150, num_steps=10, cache_interval=1)
CURVE_POINTS = 6  # evaluations over train.steps (twice as many with --compare-dit: half the time each)


def get_config(arg: str | None = None):
    c = default_config()
    c.model.update(depth=12, hidden_size=128, num_heads=4, patch_size=4, long_skip=arg != "dit", learn_sigma=False, scan_unroll=0)
    c.data.update(name="mnist", image_size=16, num_classes=10, mnist_resize="resize")
    c.train.update(steps=4500, global_batch_size=64, log_every=50, ema_decay=0.999, ema_warmup=True, min_snr_gamma=5.0)
    c.optimizer.update(lr=1e-3, warmup_steps=200, decay="cosine", end_lr_factor=0.05)
    c.checkpoint.update(every=500, keep=2)
    # sample.every (the grid's interval) keeps its old spelling: tests and experiments set it.
    c.sample.update(every=1000, sampler="ddim", num_steps=50, cfg_scale=4.0, cache_interval=2, shallow_blocks=2, clip_denoised=True)
    c.evals.classifier_fid = dict(CURVE_EVAL)
    c.demo.update(samples_per_class=10, reserve_seconds=150.0, curve_points=CURVE_POINTS)
    return finalize(c)
