"""Class-conditional Latte-skip on moving MNIST digits: the settings of
`skipdit demo --task video` (and of `skipdit train --config skipdit_jax/demo/video_config.py`).

    skipdit demo --task video          # train, sample every class with and without Skip-Cache, report

The data (`skipdit_jax.data.moving_digits`): 4-frame clips of one real MNIST digit (the
image demo's training split, resized to 12x12) moving in a straight line and bouncing
inside a 16x16 canvas, its start and speed on the 4 px patch grid (`data.motion_grid`: it
moves one patch per frame along each axis, so every frame cuts the digit into patches the
same way); the label is the digit's class. Each batch holds 16 clips plus 8 single frames
of other clips per clip (`data.images_per_video`: joint image training through the
spatial blocks, as Latte trains), a cheap source of extra digits.

Why these settings (each variant ran the demo's own code with a fixed step count, width
128, 6 pairs, DDIM-25 guided (scale 4), two at a time on 2 shared cores; per-frame class
accuracy uncached, chance 0.1):
  * 8 frames of 16x16 with 10 px digits moving 1-2 px per frame, width 64 (the first
    setting): 0.10-0.15 after 1,350-3,544 steps. 4 frames, batch 32, 2,000 steps: 0.175;
    8 frames, batch 16: 0.121; 4 frames + 4 joint images: 0.142 (10 px digits), 0.208
    (12 px); patch-aligned motion of 16 px digits on 24 px frames: 0.158.
  * Patch-aligned motion of 12 px digits on 16 px frames, 4 frames + 8 joint images,
    batch 16: 0.300 after 1,500 steps and 0.692 after 3,000 (N=2: 0.675, 1.42x, 33.8 dB),
    the steepest gain of any variant: what this config ships.
  * 6 (spatial, temporal) pairs so that Skip-Cache (k = 1 pair: a cached step runs pairs
    0 and 5, a third of the network) has a margin over the 1.25x target (1.47x predicted
    at N=2 with DDIM-25; 4 pairs predict only 1.32x). Width 128: at width 64 the accuracy
    stayed at chance.
  * `train.steps` 3,000 is about what 2 idle cores run in 15 minutes; the demo stops
    training when its time is up (2,489 steps in the measured run below).
  * The image demo's recipe otherwise: eps-MSE only, Min-SNR-5, lr 1e-3 with 200 warm-up
    steps and cosine decay to 5%, EMA 0.999 with warm-up, guided DDIM (scale 4) with x0
    clipped, `scan_unroll=0` (unrolled pair loops, faster on CPU). On the first setting,
    DDIM-50, DDIM-100, guidance 1.5 or 2, the raw weights and DDPM-100 all scored the same.
Result (`skipdit demo --task video`, 2 idle CPU cores, 2026-12-07): 759 s in all, 2,489
training steps in 700 s; per-frame class accuracy 0.61 uncached (target 0.8: not reached),
0.585 with Skip-Cache N=2 (within 0.05), 0.555 with N=3; frame agreement 0.75; Skip-Cache
N=2 1.43x measured (1.47x predicted), 32.3 dB PSNR vs uncached; N=3 1.80x (1.74x), 27.5 dB.
The accuracy still grows with training (0.30 at 1,500 steps, 0.69 at 3,000): a longer
`--minutes` budget is the way to a better model.
"""

from skipdit_jax.training.config import default_config, finalize


def get_config(arg: str | None = None):
    """`arg` "latte" drops the long skips (plain Latte, no Skip-Cache)."""
    c = default_config()
    c.model.update(
        family="latte", depth=12, hidden_size=128, num_heads=4, patch_size=4, long_skip=arg != "latte", learn_sigma=False,
        skip_init="xavier", scan_unroll=0,
    )
    c.data.update(name="moving_digits", image_size=16, digit_size=12, motion_grid=4, num_frames=4, images_per_video=8, num_classes=10)
    c.train.update(steps=3000, global_batch_size=16, log_every=50, ema_decay=0.999, ema_warmup=True, min_snr_gamma=5.0)
    c.optimizer.update(lr=1e-3, warmup_steps=200, decay="cosine", end_lr_factor=0.05)
    c.checkpoint.update(every=500, keep=2)
    c.sample.update(every=0, sampler="ddim", num_steps=25, cfg_scale=4.0, cache_interval=2, shallow_blocks=1, clip_denoised=True)
    c.demo.update(samples_per_class=5, reserve_seconds=180.0)
    c.demo.classifier_steps = 800  # the judge's training steps (mnist_classifier.DEFAULT_STEPS)
    c.demo.timing_repeats = 2  # each sampling setting is timed twice, the faster run counts
    return finalize(c)
