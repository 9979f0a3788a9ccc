"""Two-stage fine-tune of a pretrained DiT-XL/2 into a Skip-DiT-XL/2 (the text-to-video recipe,
applied to class-to-image).

    skipdit convert DiT-XL-2-256x256.pt models/dit-xl-2 --preset DiT-XL/2
    # stage 1: only the 14 fresh skip-fusion modules train
    skipdit train --config configs/finetune_dit_to_skipdit.py:stage1 --workdir runs/ft-stage1 \
        --config.train.init_from=models/dit-xl-2 --config.data.path=/data/in256-latents
    # stage 2: everything trains, starting from stage 1's weights
    skipdit train --config configs/finetune_dit_to_skipdit.py:stage2 --workdir runs/ft-stage2 \
        --config.train.init_from=runs/ft-stage1 --config.data.path=/data/in256-latents

`init_from` takes a converted model directory, an official checkpoint file or a training
workdir (its latest raw parameters). Weights it lacks (the skip modules, from a vanilla
DiT) keep their fresh initialisation (PyTorch's Linear default, as the official code).
Stage 1 uses the recipe's update guard: an update whose gradient norm is not finite or above
`train.grad_skip_threshold` is skipped and counted. A preview grid (DDIM-50, Skip-Cache N=2)
every 10K steps; for an in-loop FID add `evals.fid` as in configs/imagenet256_skipdit_xl2.py.
"""

from skipdit_jax.training.config import default_config, finalize


def get_config(arg: str | None = "stage1"):
    stage = arg or "stage1"
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"use finetune_dit_to_skipdit.py:stage1 or :stage2, got {stage!r}")
    c = default_config()
    c.model.update(depth=28, hidden_size=1152, num_heads=16, patch_size=2, long_skip=True, learn_sigma=True)
    c.data.update(name="latents", path="", image_size=256, num_classes=1000, flip=True)
    c.train.update(
        steps=20_000 if stage == "stage1" else 200_000,
        global_batch_size=256,
        log_every=100,
        ema_decay=0.9999,
        trainable="skip_only" if stage == "stage1" else "all",
        grad_skip_threshold=10.0 if stage == "stage1" else None,
    )
    c.optimizer.update(lr=1e-4, decay="constant")
    c.checkpoint.update(every=5_000, keep=3)
    c.sample.update(sampler="ddim", num_steps=50, cfg_scale=4.0, cache_interval=2, shallow_blocks=4, clip_denoised=False)
    c.evals.grid.every = 10_000
    return finalize(c)
