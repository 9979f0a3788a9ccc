"""Videos: MP4/GIF writing and reading back, frame folders, `indices`, the official uint8
conversion and the one-line errors; `skipdit sample` / `sample-many` on a tiny Latte."""

import numpy as np
import pytest
from PIL import Image

from skipdit_jax import videos
from skipdit_jax.errors import UserError


def _smooth_video(f=5, h=33, w=31, seed=0):
    """Moving smooth gradients (what H.264 reproduces closely), distinct per frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(f):
        a, b = rng.uniform(2, 5, 2)
        frames.append(np.stack([(xx * a + 9 * t) % 200 + 20, (yy * b + 5 * t) % 200 + 20, np.full_like(xx, 60 + 20 * t)], -1))
    return np.asarray(frames, np.uint8)


# ---- videos.py ------------------------------------------------------------------------------
def test_mp4_round_trip_odd_size_padded_indices_and_frame_count(tmp_path):
    frames = _smooth_video()
    path = tmp_path / "sub" / "v.mp4"
    videos.write_mp4(path, frames, fps=8)
    assert [p.name for p in path.parent.iterdir()] == ["v.mp4"]  # no temporary left behind
    back = videos.read_video(path)
    assert back.shape == (5, 34, 32, 3) and back.dtype == np.uint8  # odd sizes padded to even
    err = np.abs(back[:, :33, :31].astype(int) - frames.astype(int))
    assert err.mean() < 3.0, err.mean()
    # The padding replicates the last row / column.
    assert np.abs(back[:, 33].astype(int) - back[:, 32].astype(int)).mean() < 3.0
    assert videos.video_num_frames(path) == 5
    picked = videos.read_video(path, indices=[3, 0, 3])
    np.testing.assert_array_equal(picked, back[[3, 0, 3]])
    with pytest.raises(UserError, match=r"v\.mp4.*5 frames.*frame 7"):
        videos.read_video(path, indices=[1, 7])


def test_gif_round_trip_and_grayscale(tmp_path):
    frames = _smooth_video(f=4, h=16, w=12)
    videos.write_gif(tmp_path / "v.gif", frames, fps=8)
    back = videos.read_video(tmp_path / "v.gif")
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4.0
    assert videos.video_num_frames(tmp_path / "v.gif") == 4
    with Image.open(tmp_path / "v.gif") as im:
        assert im.n_frames == 4 and im.info["duration"] == 10 * round(100 / 8) and im.info["loop"] == 0
    gray = frames[..., :1]
    videos.write_gif(tmp_path / "g.gif", gray)
    back = videos.read_video(tmp_path / "g.gif")
    assert back.shape == (4, 16, 12, 3)
    assert np.abs(back[..., 0].astype(int) - gray[..., 0].astype(int)).max() <= 2


def test_frame_folder_sorted_by_name_with_indices(tmp_path):
    frames = _smooth_video(f=3, h=8, w=10)
    for frame, name in zip(frames, ["c.png", "a.png", "b.png"], strict=True):
        Image.fromarray(frame).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a frame")
    back = videos.read_video(tmp_path)
    np.testing.assert_array_equal(back, frames[[1, 2, 0]])
    np.testing.assert_array_equal(videos.read_video(tmp_path, indices=[2]), frames[[0]])
    assert videos.video_num_frames(tmp_path) == 3
    with pytest.raises(UserError, match="3 frames, frame 3"):
        videos.read_video(tmp_path, indices=[3])


def test_video_to_uint8_is_the_official_rounding():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0], np.float32)
    # ((x * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(uint8), written out independently
    want = np.clip((x * 0.5 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(videos.video_to_uint8(x), want)
    assert videos.video_to_uint8(np.zeros((2, 3, 4, 4, 3))).shape == (2, 3, 4, 4, 3)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.mp4"):
        videos.read_video(tmp_path / "missing.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 20)
    for fn in (videos.read_video, videos.video_num_frames):
        with pytest.raises(UserError, match="bad.mp4: cannot decode"):
            fn(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no frame images"):
        videos.read_video(tmp_path / "empty")
    with pytest.raises(UserError, match="uint8"):
        videos.write_mp4(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match=r"\(F, H, W, 3\)"):
        videos.write_mp4(tmp_path / "x.mp4", np.zeros((8, 8, 3), np.uint8))
    assert not (tmp_path / "x.mp4").exists()
