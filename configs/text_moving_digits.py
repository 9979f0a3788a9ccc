"""Text-to-video on a CPU: a tiny Latte-T2V-skip and a small T5 encoder trained together from
scratch on captioned moving digits ("a 7 moving up and right"; skipdit_jax.data.text_video).

    skipdit train --config configs/text_moving_digits.py --workdir runs/text-digits
    # the two-stage Skip-DiT recipe in miniature: a vanilla model first, then its skips
    skipdit train --config configs/text_moving_digits.py:vanilla --workdir runs/text-digits-vanilla
    skipdit train --config configs/text_moving_digits.py:stage1 --workdir runs/text-digits-s1 \
        --config.train.init_from=runs/text-digits-vanilla
    skipdit train --config configs/text_moving_digits.py:stage2 --workdir runs/text-digits-s2 \
        --config.train.init_from=runs/text-digits-s1

Nothing is downloaded: the clips are the bundled MNIST digits, the captions come from each
clip's digit and starting direction, and their tokens from the caption grammar's 17-word
vocabulary (`WORD_VOCAB`: T5's pad / eos / unk ids, then the words). The model
(`latte_t2v_joint`): 4 (spatial, temporal) pairs of width 64 with long skips over 8 frames of
16x16x1 pixels (patch 2: 64 tokens a frame), conditioned by a 2-layer T5 of width 64 on 8
tokens. Captions are dropped (replaced by the empty prompt) with probability 0.1, so
classifier-free guidance works. AdamW 2e-4 constant, EMA 0.999 with warm-up (a short run),
float32. Everything else is the t2v recipe's update guard: an update whose gradient norm is
not finite is skipped and counted (the official threshold of 0.02 belongs to fine-tuning a
pretrained model; set train.grad_skip_threshold to use one).
"""

from skipdit_jax.training.config import default_config, finalize

ARGS = ("", "skip", "vanilla", "stage1", "stage2")


def get_config(arg: str | None = None):
    arg = arg or ""
    if arg not in ARGS:
        raise ValueError(f"text_moving_digits.py takes no argument, or one of {', '.join(a for a in ARGS if a)}; got {arg!r}")
    c = default_config()
    c.seed = 0
    c.model.update(
        family="latte_t2v_joint", depth=4, hidden_size=64, num_heads=4, patch_size=2, mlp_ratio=4.0,
        long_skip=arg != "vanilla", learn_sigma=True, skip_init="torch_default", dtype="float32",
    )
    c.model.caption_channels = 64
    c.model.text_layers = 2
    c.model.text_heads = 4
    c.model.text_d_kv = 16
    c.model.text_d_ff = 128
    c.data.update(name="text_moving_digits", image_size=16, num_classes=0, flip=False, num_frames=8, text_len=8)
    c.train.update(
        steps=3000 if arg in ("", "skip", "vanilla", "stage2") else 500, global_batch_size=16, log_every=50,
        ema_decay=0.999, ema_warmup=True, label_dropout=0.1, trainable="skip_only" if arg == "stage1" else "all",
        init_use_ema=arg == "stage2",
    )
    c.optimizer.update(lr=2e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=0.0)
    c.checkpoint.update(every=500, keep=2)
    c.sample.update(sampler="ddim", num_steps=25, cfg_scale=4.0, clip_denoised=True, cache_interval=2, shallow_blocks=1)
    c.evals.grid.every = 0
    return finalize(c)
