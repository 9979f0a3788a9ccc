"""Latte-XL/2-skip on Sky Time-lapse (256x256, unconditional): the official class-to-video recipe
(train_with_img.py + sky_img_train.yaml).

Data: Sky Time-lapse (https://github.com/weixiong-ur/mdgan), sky_timelapse/sky_train: folders of
JPEG frames, each folder one video (every folder under the root that holds frames).

    skipdit extract-latents /data/sky_timelapse/sky_train /data/sky-latents --video --vae hf://stabilityai/sd-vae-ft-mse \
        --image_size 256 --num_frames 16 --frame_interval 3 --classes=false --video_resize center_crop_resize \
        --frame_sampling stride --flip=false --clips_per_video 4
    skipdit train --config configs/latte_sky.py --workdir gs://BUCKET/latte-sky \
        --config.data.path=/data/sky-latents
    # on a pod, on every host: add --coordinator_address HOST:PORT --num_processes N --process_id I
    # vanilla Latte-XL/2 (no long skips), the baseline: configs/latte_sky.py:latte

AdamW lr 1e-4 (the official code hard-codes it), weight decay 0, no warm-up, linear decay to 0 at
step 1,000,000 (max_train_steps); gradient-norm clipping at 0.1 from update 20,000 on
(start_clip_iter); global batch 32 (4 x 8 GPUs), EMA 0.9999, hybrid loss, t ~ U{0..999}; 16 frames 3
apart plus 8 joint images per video (frames of random videos); no flips (as the official Sky
loader); CenterCropResizeVideo, frames every 3rd from the crop's start (the frame-folder loader's
stride). Latents: sd-vae-ft-mse, posterior sample x 0.18215, one record per extracted clip
(--clips_per_video random clips per video; the official loader draws a new crop every epoch). See
skipdit_jax/training/video_recipes.py for the whole recipe.
"""

from skipdit_jax.training.video_recipes import latte_c2v


def get_config(arg: str | None = None):
    return latte_c2v("sky", arg)
