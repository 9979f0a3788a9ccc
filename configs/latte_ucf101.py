"""Latte-XL/2-skip on UCF-101 (256x256, 101 classes): the official class-to-video recipe
(train_with_img.py + ucf101_img_train.yaml).

Data: UCF-101 (https://www.crcv.ucf.edu/data/UCF101.php, UCF101.rar), unpacked as
ROOT/CLASS/v_*.avi: the 101 class folders, sorted by name, are the labels; the official code trains
on all 13,320 videos (no split).

    skipdit extract-latents /data/UCF-101 /data/ucf101-latents --video --vae hf://stabilityai/sd-vae-ft-mse \
        --image_size 256 --num_frames 16 --frame_interval 3 --video_resize center_crop --clips_per_video 4
    skipdit train --config configs/latte_ucf101.py --workdir gs://BUCKET/latte-ucf101 \
        --config.data.path=/data/ucf101-latents
    # on a pod, on every host: add --coordinator_address HOST:PORT --num_processes N --process_id I
    # vanilla Latte-XL/2 (no long skips), the baseline: configs/latte_ucf101.py:latte

AdamW lr 1e-4 (the official code hard-codes it), weight decay 0, linear warm-up over 300 steps, then
linear decay to 0 at step 100,000 (max_train_steps); gradient-norm clipping at 0.1 from update
10,000 on (start_clip_iter); global batch 32 (4 x 8 GPUs), EMA 0.9999, hybrid loss, t ~ U{0..999};
16 frames 3 apart plus 8 joint images per video (frames of random videos, each conditioned on its own
label as the official y_image); random horizontal flips (pre-extracted latents of the mirrored
clips); UCFCenterCropVideo. Latents: sd-vae-ft-mse, posterior sample x 0.18215, one record per
extracted clip (--clips_per_video random clips per video; the official loader draws a new crop every
epoch). See skipdit_jax/training/video_recipes.py for the whole recipe.
"""

from skipdit_jax.training.video_recipes import latte_c2v


def get_config(arg: str | None = None):
    return latte_c2v("ucf101", arg)
