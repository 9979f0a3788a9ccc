"""Latte-XL/2-skip on Taichi-HD (256x256, unconditional): the official class-to-video recipe
(train_with_img.py + taichi_img_train.yaml).

Data: Taichi-HD (https://github.com/AliaksandrSiarohin/first-order-model, taichi-hd, 256x256 PNG
frames), one folder of frames per video (every folder under the root that holds frames).

    skipdit extract-latents /data/taichi/train /data/taichi-latents --video --vae hf://stabilityai/sd-vae-ft-mse \
        --image_size 256 --num_frames 16 --frame_interval 3 --classes=false --video_resize center_crop_resize \
        --frame_sampling stride --clips_per_video 4
    skipdit train --config configs/latte_taichi.py --workdir gs://BUCKET/latte-taichi \
        --config.data.path=/data/taichi-latents
    # on a pod, on every host: add --coordinator_address HOST:PORT --num_processes N --process_id I
    # vanilla Latte-XL/2 (no long skips), the baseline: configs/latte_taichi.py:latte

AdamW lr 1e-4 (the official code hard-codes it), weight decay 0, no warm-up, linear decay to 0 at
step 1,000,000 (max_train_steps); gradient-norm clipping at 0.1 from update 500,000 on
(start_clip_iter); global batch 32 (4 x 8 GPUs), EMA 0.9999, hybrid loss, t ~ U{0..999}; 16 frames 3
apart plus 8 joint images per video (frames of random videos); random horizontal flips; the frames
are already 256x256 (the official loader does not resize; center_crop_resize is the identity there),
every 3rd frame from the crop's start. Latents: sd-vae-ft-mse, posterior sample x 0.18215, one
record per extracted clip (--clips_per_video random clips per video; the official loader draws a new
crop every epoch). See skipdit_jax/training/video_recipes.py for the whole recipe.
"""

from skipdit_jax.training.video_recipes import latte_c2v


def get_config(arg: str | None = None):
    return latte_c2v("taichi", arg)
