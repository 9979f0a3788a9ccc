"""Video training data: the official c2v clip sampling (TemporalRandomCrop + linspace, the
frame-folder stride) and resizing (UCFCenterCropVideo, CenterCropResizeVideo) against
independent references, `VideoFolderSource` on tiny MP4s and frame folders, the Grain
pipeline on videos (W-axis flip, joint images, exact resume), and
`skipdit extract-latents --video` round trip with a tiny random VAE."""

import numpy as np
import pytest
from absl import flags
from PIL import Image

from skipdit_jax import data
from skipdit_jax.data.video_sources import temporal_window
from skipdit_jax.errors import ConfigError, UserError


def _frames(seed, n, h, w):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _write_frame_folder(folder, frames):
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:03d}.png")


def _official_indices(total, num_frames, interval, begin):
    """Latte's TemporalRandomCrop window at `begin`, then linspace(begin, end - 1) as int."""
    size = num_frames * interval
    assert 0 <= begin <= max(0, total - size - 1)
    end = min(begin + size, total)
    assert end - begin >= num_frames
    return np.linspace(begin, end - 1, num_frames, dtype=int)


# ---- clip sampling and resizing ------------------------------------------------------------
@pytest.mark.parametrize("total", [4, 9, 12, 13, 14, 30])
def test_clip_indices_follow_temporal_random_crop(total):
    n, interval = 4, 3  # window 12
    begins = set()
    for seed in range(300):
        idx = data.clip_indices(total, n, interval, np.random.default_rng(seed))
        begin = temporal_window(total, n * interval, np.random.default_rng(seed))[0]
        begins.add(begin)
        np.testing.assert_array_equal(idx, _official_indices(total, n, interval, begin))
        stride = data.clip_indices(total, n, interval, np.random.default_rng(seed), "stride")
        if total - begin >= n * interval:  # the frame-folder loaders: every 3rd frame of the window
            np.testing.assert_array_equal(stride, begin + interval * np.arange(n))
        else:  # a short video: covered whole, as linspace
            np.testing.assert_array_equal(stride, idx)
    # The start is uniform over 0..max(0, total - size - 1): every value occurs, no other.
    assert begins == set(range(max(0, total - n * interval - 1) + 1))
    with pytest.raises(UserError, match=f"{total} frames, fewer than the {total + 1} frames"):
        data.clip_indices(total, total + 1, interval, np.random.default_rng(0))


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for h, w in [(10, 14), (14, 10), (9, 9)]:
        frames = _frames(h * w, 2, h, w)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # ToTensorVideo
        # UCFCenterCropVideo(8): scale the short side to 8, then centre crop.
        scale = 8 / min(h, w)
        r = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        i, j = int(round((r.shape[-2] - 8) / 2.0)), int(round((r.shape[-1] - 8) / 2.0))
        want = (r[..., i : i + 8, j : j + 8] - 0.5) / 0.5
        got = data.resize_frames(frames, 8, "center_crop")
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=2e-6)
        # CenterCropResizeVideo(8): the central short-side square, then resize to 8.
        s = min(h, w)
        i, j = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        want = (F.interpolate(x[..., i : i + s, j : j + s], size=(8, 8), mode="bilinear", align_corners=False) - 0.5) / 0.5
        got = data.resize_frames(frames, 8, "center_crop_resize")
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=2e-6)
    # A short side whose scaled size PyTorch floors to 255 (322 * 256 / 322) still gives 256.
    assert data.resize_frames(np.zeros((1, 322, 330, 3), np.uint8), 256, "center_crop").shape == (1, 256, 256, 3)
    with pytest.raises(ConfigError, match="video resize"):
        data.resize_frames(frames, 8, "stretch")


# ---- the folder source ---------------------------------------------------------------------
@pytest.fixture
def video_root(tmp_path):
    """ROOT/a/{v0.mp4, v1/ (frames)}, ROOT/b/v2/ (frames): 10, 7 and 8 frames of 12x16."""
    from skipdit_jax.videos import write_mp4

    root = tmp_path / "videos"
    (root / "a").mkdir(parents=True)
    write_mp4(root / "a" / "v0.mp4", _frames(0, 10, 12, 16))
    _write_frame_folder(root / "a" / "v1", _frames(1, 7, 12, 16))
    _write_frame_folder(root / "b" / "v2", _frames(2, 8, 12, 16))
    return root


def test_video_folder_source_layout_clips_and_errors(video_root, tmp_path):
    src = data.VideoFolderSource(video_root, image_size=8, num_frames=4, frame_interval=2)
    assert src.classes == ["a", "b"] and len(src) == 3
    assert [p.split("videos/")[1] for p, _ in src.videos] == ["a/v0.mp4", "a/v1", "b/v2"]
    assert src.labels.tolist() == [0, 0, 1] and int(src[2]["label"]) == 1 and int(src[2]["video_index"]) == 2
    uncond = data.VideoFolderSource(video_root, image_size=8, num_frames=4, classes=False)
    assert uncond.classes == [] and len(uncond) == 3 and uncond.labels.tolist() == [0, 0, 0]

    # A frame folder's clip is exactly its frames at the official indices, resized.
    frames = _frames(2, 8, 12, 16)
    for seed in range(3):
        idx = data.clip_indices(8, 4, 2, np.random.default_rng(seed))
        np.testing.assert_allclose(src.clip(2, np.random.default_rng(seed)), data.resize_frames(frames[idx], 8, "center_crop"))
    clip = src.clip(0, np.random.default_rng(0))  # the MP4 (lossy H.264): shape and range
    assert clip.shape == (4, 8, 8, 3) and clip.dtype == np.float32 and -1 <= clip.min() and clip.max() <= 1
    assert src.random_frame(1, np.random.default_rng(0)).shape == (8, 8, 3)

    with pytest.raises(UserError, match=r"v1: has 7 frames, fewer than the 8 frames of a clip"):
        data.VideoFolderSource(video_root, image_size=8, num_frames=8).clip(1, np.random.default_rng(0))
    (video_root / "empty_class").mkdir()
    with pytest.raises(UserError, match="class folder.*without videos.*empty_class"):
        data.VideoFolderSource(video_root, image_size=8, num_frames=4)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no videos"):
        data.VideoFolderSource(tmp_path / "nothing", image_size=8, num_frames=4, classes=False)
    with pytest.raises(UserError, match="does not exist"):
        data.VideoFolderSource(tmp_path / "missing", image_size=8, num_frames=4)
    with pytest.raises(ConfigError, match="frame sampling"):
        data.VideoFolderSource(video_root, image_size=8, num_frames=4, frame_sampling="random")


# ---- the pipeline on videos -----------------------------------------------------------------
def _coded_videos(n=6, frames=3):
    """Video i has every pixel of frame f equal to (10 i + f) / 100 except a marker column
    (x = 0) at -1, so a frame names its video and a flip is visible. Labels i % 2."""
    v = np.zeros((n, frames, 4, 4, 1), np.float32)
    for i in range(n):
        for f in range(frames):
            v[i, f] = (10 * i + f) / 100
    v[..., 0, :] = -1.0
    return data.ArraySource(v, np.arange(n) % 2)


@pytest.mark.parametrize("own_labels", [False, True])
def test_pipeline_flips_the_w_axis_and_appends_joint_images(own_labels):
    src = _coded_videos()
    fields = {"image": np.float32, "label": np.int32, **({"image_labels": np.int32} if own_labels else {})}
    it = data.make_train_iterator(src, global_batch_size=6, seed=0, flip=True, images_per_video=2, fields=fields, read_threads=1)
    flips, cross_class = 0, 0
    for _ in range(4):
        b = next(it)
        assert b["image"].shape == (6, 5, 4, 4, 1) and set(b) == set(fields)
        for x, y in zip(b["image"], b["label"], strict=True):
            video = x[:3]
            flipped = bool((video[..., -1, :] == -1).all())
            assert flipped or (video[..., 0, :] == -1).all()  # the marker column moved along W only
            flips += flipped
            i = int(round(video[0, 1, 1, 0] * 100)) // 10
            assert int(y) == i % 2
            for image in x[3:]:  # unflipped frames of (possibly other) videos
                assert (image[:, 0, 0] == -1).all()
                j, f = divmod(int(round(image[1, 1, 0] * 100)), 10)
                assert 0 <= f < 3
                cross_class += j % 2 != int(y)
        if own_labels:
            codes = np.rint(b["image"][:, 3:, 1, 1, 0] * 100).astype(int) // 10
            np.testing.assert_array_equal(b["image_labels"], codes % 2)
    assert 0 < flips < 24
    # Without the images' own labels, images come from videos of the example's class.
    assert (cross_class > 0) == own_labels


def test_video_iterator_resumes_exactly(video_root):
    src = data.VideoFolderSource(video_root, image_size=8, num_frames=4, frame_interval=2)
    make = lambda: data.make_train_iterator(src, global_batch_size=2, seed=3, flip=True, images_per_video=1, read_threads=2)  # noqa: E731
    it = make()
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    again = make()
    for want in first:  # a fresh iterator repeats the run from its seed
        np.testing.assert_array_equal(next(again)["image"], want["image"])
    resumed = make()
    resumed.set_state(state)
    for want in rest:
        got = next(resumed)
        assert got["image"].shape == (2, 5, 8, 8, 3)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


# ---- skipdit extract-latents --video ----------------------------------------------------------
def test_extract_latents_video_round_trip(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    import jax

    from skipdit_jax.commands import extract_latents
    from skipdit_jax.encoders.vae import encode_to_latents, load_vae

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(tmp_path / "vae")
    videos = {("cat", "v0"): _frames(10, 6, 16, 20), ("dog", "v1"): _frames(11, 5, 16, 20)}
    for (c, v), frames in videos.items():
        _write_frame_folder(tmp_path / "videos" / c / v, frames)

    def run(*argv):
        fv = flags.FlagValues()
        extract_latents.define_flags(fv)
        return extract_latents.main(fv(["skipdit extract-latents", *argv])[1:], fv)

    out = tmp_path / "latents"
    # 2 clips per video of 4 frames; batch 8 frames = 2 clips; a 2x VAE: 16x16 -> 8x8x4.
    common = ["--video", "--vae", str(tmp_path / "vae"), "--image_size", "16", "--num_frames", "4", "--frame_interval", "2"]
    shards = ["--num_shards", "2"]
    assert run(str(tmp_path / "videos"), str(out), *common, "--batch_size", "8", "--clips_per_video", "2", *shards) == 0
    assert capsys.readouterr().out.strip().startswith("extracted 4 latents 4x8x8x4 (+ flipped) of 2 classes")

    src = data.LatentSource(out)
    assert len(src) == 4 and src.latent_shape == (4, 8, 8, 4) and src.has_flipped
    assert src.metadata["num_frames"] == 4 and src.metadata["labels"] == [0, 0, 1, 1]
    assert src.labels.tolist() == [int(src[i]["label"]) for i in range(4)]  # in read order (shards interleave)

    # Batch 0 = the two clips of video 0 (starts from default_rng((seed, video, clip))), every
    # frame encoded with the keys split from fold_in(key(seed), 0); write record i -> shard i % 2.
    config, params = load_vae(tmp_path / "vae")
    frames = videos[("cat", "v0")]
    starts = [data.clip_indices(6, 4, 2, np.random.default_rng((0, 0, c))) for c in range(2)]
    clips = np.stack([data.resize_frames(frames[idx], 16, "center_crop") for idx in starts])
    key_plain, key_flip = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))
    encode = jax.jit(encode_to_latents, static_argnums=1)
    want = np.asarray(encode(params, config, clips.reshape(8, 16, 16, 3), key_plain)).reshape(2, 4, 8, 8, 4)
    want_flipped = np.asarray(encode(params, config, clips[..., ::-1, :].reshape(8, 16, 16, 3), key_flip)).reshape(2, 4, 8, 8, 4)
    for c, read_index in [(0, 0), (1, 2)]:
        np.testing.assert_allclose(src[read_index]["image"], want[c], atol=1e-5)
        np.testing.assert_allclose(src[read_index]["image_flipped"], want_flipped[c], atol=1e-5)

    # The latents feed the training pipeline: flipped latents, joint images of the same class.
    it = data.make_train_iterator(src, global_batch_size=2, seed=0, flip=True, images_per_video=2, read_threads=1)
    b = next(it)
    assert b["image"].shape == (2, 6, 8, 8, 4) and np.isfinite(b["image"]).all()

    with pytest.raises(UserError, match="fewer than the 6 frames"):
        run(str(tmp_path / "videos"), str(tmp_path / "x"), *common[:-4], "--num_frames", "6")
