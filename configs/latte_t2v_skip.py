"""Latte-T2V-skip: the official two-stage text-to-video recipe (`train_skip_dit.py` with
`configs/t2v/t2v_joint_train_skip.yaml` of the Skip-DiT code) on 512x512 video latents
with T5-v1.1-XXL caption embeddings.

    # 1. the base model, Latte-0 (its transformer is LatteT2V without skips), converted once:
    skipdit convert Latte-0/transformer models/latte-0 --family latte_t2v
    # 2. latents: 16 frames 4 apart, centre square resized to 512, each clip's caption
    #    encoded by T5 (120 tokens) and stored beside its latents:
    skipdit extract-latents /data/videos /data/t2v-latents --video --classes=false --flip=false \
        --vae Latte-1/vae --image_size 512 --num_frames 16 --frame_interval 4 \
        --video_resize center_crop_resize --captions /data/captions.csv \
        --t5 Latte-1/text_encoder --tokenizer Latte-1/tokenizer --text_len 120
    # 3. stage 1: only the 14 skip-fusion modules train (everything else frozen, no Adam state)
    skipdit train --config configs/latte_t2v_skip.py:stage1 --workdir runs/t2v-stage1 \
        --config.train.init_from=models/latte-0 --config.data.path=/data/t2v-latents
    # 4. stage 2: everything trains, from stage 1's EMA weights
    skipdit train --config configs/latte_t2v_skip.py:stage2 --workdir runs/t2v-stage2 \
        --config.train.init_from=runs/t2v-stage1 --config.data.path=/data/t2v-latents

What the official script does, and these configs set:
  - init from Latte-0 (`from_pretrained`, unknown keys dropped); the skip modules keep their
    fresh initialisation (PyTorch's default Linear / LayerNorm init: skip_init="torch_default");
  - stage 1 (`freeze: True`): every parameter whose name lacks skip_linear / skip_norm is
    frozen, so only the fusions train; stage 2 (`freeze: False`): all parameters train. The
    second stage loads the first's checkpoint, whose "ema" weights the script prefers;
  - AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0; diffusers' "constant" schedule (the
    configured 100 warm-up steps are ignored by "constant"); no gradient clipping;
  - an update is skipped when the gradient norm (over the trainable parameters) is NaN or
    above 0.02; the trainer counts them (`skipped_updates`) and leaves weights, Adam state
    and EMA untouched;
  - global batch 32 = 2 per GPU x 8 GPUs x 2 accumulated micro-batches; EMA decay
    1 - 1e-4 * (2 + 1) / 2 = 0.99985, applied once per optimizer step; seed 3407;
  - fp16 autocast with fp32 master weights and gradient checkpointing: here bfloat16 compute
    with float32 parameters, gradients and optimizer state, and rematerialised blocks;
  - hybrid loss (eps MSE + VLB), t ~ U{0..999}, linear betas; no caption dropout (the T2V
    model has none: classifier-free guidance relies on Latte-0's training), so
    label_dropout = 0;
  - data: 512x512 (64x64x4 latents), 16 frames 4 apart, CenterCropResizeVideo, T5 at the
    tokenizer's 120 tokens; checkpoints every 10K steps (ckpt_every);
  - joint image-video training (use_image_num: 4): every clip comes with 4 single frames of
    random clips, each with its own clip's caption (data.images_per_video=4); the images
    share the spatial blocks and skip the temporal ones.

Differences, by construction or choice:
  - the official `train_steps` counts micro-batches (max_train_steps 1M); `train.steps` counts
    optimizer steps: stage 2 is 500K (= 1M micro-batches); the released Latte-skip is named
    after 330K micro-batches (165K steps). The paper gives no stage-1 length: 20K here;
  - captions are encoded once at extraction instead of every step (the same T5 output), and a
    record's temporal crop is fixed at extraction (extract several clips per video for variety).
"""

from skipdit_jax.training.config import default_config, finalize

STAGES = ("stage1", "stage2")


def get_config(arg: str | None = "stage1"):
    stage = arg or "stage1"
    if stage not in STAGES:
        raise ValueError(f"use latte_t2v_skip.py:stage1 (skip modules only) or :stage2 (everything), got {arg!r}")
    c = default_config()
    c.seed = 3407
    c.model.update(
        family="latte_t2v", depth=28, hidden_size=1152, num_heads=16, patch_size=2, mlp_ratio=4.0, long_skip=True,
        learn_sigma=True, skip_init="torch_default", dtype="bfloat16", remat_policy="nothing_saveable",
    )
    c.data.update(
        name="latents", path="", image_size=512, num_classes=0, flip=False, num_frames=16, frame_interval=4,
        images_per_video=4, video_resize="center_crop_resize", frame_sampling="linspace", text_len=120,
    )
    c.train.update(
        steps=20_000 if stage == "stage1" else 500_000, global_batch_size=32, grad_accum_steps=2, log_every=10,
        ema_decay=1 - 1e-4 * (2 + 1) / 2, ema_warmup=False, label_dropout=0.0, grad_skip_threshold=0.02,
        trainable="skip_only" if stage == "stage1" else "all", init_use_ema=stage == "stage2",
    )
    c.optimizer.update(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, decay="constant", grad_clip=0.0)
    c.checkpoint.update(every=10_000, keep=3)
    c.mesh.update(data=-1, fsdp=1)
    # The official t2v sampling (sample/t2v_sample_*.yaml): DDIM-50 with diffusers' scheduler,
    # guidance 7.5, no clipping in latent space; previews are opt-in (a text model needs prompts).
    c.sample.update(sampler="ddim", num_steps=50, cfg_scale=7.5, clip_denoised=False, cache_interval=2, shallow_blocks=1)
    c.evals.grid.every = 0
    return finalize(c)
