"""Two-stage fine-tune of a pretrained (vanilla) Latte-XL/2 into a Latte-XL/2-skip: the
text-to-video recipe of the Skip-DiT paper (stage 1: only the fresh skip modules train;
stage 2: everything trains) applied to a class-to-video model, on the c2v data of
configs/latte_{ucf101,sky,taichi,ffs}.py.

    # the released vanilla Latte weights (https://huggingface.co/maxin-cn/Latte: ucf101.pt,
    # skytimelapse.pt, taichi.pt, ffs.pt), converted once:
    skipdit convert ucf101.pt models/latte-ucf101 --preset Latte-XL/2
    # latents as for configs/latte_ucf101.py:
    skipdit extract-latents /data/UCF-101 /data/ucf101-latents --video --vae hf://stabilityai/sd-vae-ft-mse \
        --image_size 256 --num_frames 16 --frame_interval 3 --clips_per_video 4
    # stage 1: only the 7 skip-fusion modules (`skip_fusions`) train
    skipdit train --config configs/finetune_latte_to_skip.py:stage1 --workdir runs/latte-ft-stage1 \
        --config.train.init_from=models/latte-ucf101 --config.data.path=/data/ucf101-latents
    # stage 2: everything trains, from stage 1's weights
    skipdit train --config configs/finetune_latte_to_skip.py:stage2 --workdir runs/latte-ft-stage2 \
        --config.train.init_from=runs/latte-ft-stage1 --config.data.path=/data/ucf101-latents
    # the unconditional datasets: :stage1_sky, :stage2_sky, :stage1_taichi, ... :stage2_ffs

`init_from` takes a converted model directory, an official checkpoint file or a training
workdir (its latest raw parameters); the skip modules a vanilla Latte lacks keep their fresh
initialisation (xavier-uniform weight, zero bias, as the official c2v code). Everything else is
the c2v recipe of the dataset (skipdit_jax/training/video_recipes.py: 16 frames + 8 joint
images, global batch 32, EMA 0.9999, gradient-norm clipping at 0.1), except the schedule: the
t2v fine-tune's constant AdamW lr 1e-4 without warm-up, clipping from the first update, and
the stage lengths (20K skip-only steps, then 200K full steps), which the paper does not give
for class-to-video and are this config's choice.
"""

from skipdit_jax.training.config import finalize
from skipdit_jax.training.video_recipes import C2V_DATASETS, latte_c2v


def get_config(arg: str | None = "stage1"):
    stage, _, dataset = (arg or "stage1").partition("_")
    dataset = dataset or "ucf101"
    if stage not in ("stage1", "stage2") or dataset not in C2V_DATASETS:
        choices = ", ".join(C2V_DATASETS)
        raise ValueError(f"use finetune_latte_to_skip.py:STAGE[_DATASET] (stage1/stage2; DATASET: {choices}), got {arg!r}")
    c = latte_c2v(dataset, "skip", lock=False)
    c.train.update(steps=20_000 if stage == "stage1" else 200_000, trainable="skip_only" if stage == "stage1" else "all")
    c.optimizer.update(lr=1e-4, warmup_steps=0, decay="constant", grad_clip=0.1, clip_after_steps=0)
    c.checkpoint.update(every=5_000, keep=3)
    return finalize(c)
