"""Every file access on a (fake) gs:// bucket: `paths`, images, model directories, latents,
image folders, checkpoint files, the classifier, and `skipdit sample`/`convert`.

`fake_gcs` (tests/fake_gcs.py) maps gs://BUCKET/KEY to a local folder for epath and Orbax,
and fails a test that created a local "gs:" folder (a local-only API given a gs:// path).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from PIL import Image

import fake_gcs as fake_gcs_lib
from fake_gcs import fake_gcs  # noqa: F401  (the fixture)
from helpers import random_params, tiny_config
from skipdit_jax import data, images, model_store, paths
from skipdit_jax.convert import dit_to_torch, load_torch_checkpoint, save_torch_safetensors
from skipdit_jax.errors import CheckpointError, UserError

CFG = tiny_config(depth=4, hidden_size=32, num_heads=4)
PARAMS = random_params(CFG)
TESTS_DIR = str(Path(__file__).parent)


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ---- the fake itself -----------------------------------------------------------------------
def test_fake_maps_epath_and_orbax_to_the_local_root(fake_gcs):
    p = epath.Path("gs://bucket/dir/a.txt")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("hello")
    assert (fake_gcs / "bucket" / "dir" / "a.txt").read_text() == "hello"
    assert [str(f) for f in epath.Path("gs://bucket/dir").glob("*.txt")] == ["gs://bucket/dir/a.txt"]
    assert [str(f) for f in paths.walk_files("gs://bucket")] == ["gs://bucket/dir/a.txt"]

    tree = {"a": np.arange(4.0), "b": {"c": np.ones((2, 3), np.float32)}}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(epath.Path("gs://bucket/ckpt"), tree)
    ckptr.wait_until_finished()
    assert (fake_gcs / "bucket" / "ckpt" / "commit_success.txt").exists()  # GCS-style commit, no rename
    assert _tree_equal(ckptr.restore(epath.Path("gs://bucket/ckpt"), tree), tree)

    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(epath.Path("gs://bucket/run"), options=options) as mngr:
        for step in range(4):
            mngr.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda x: x + step, tree)))
        mngr.wait_until_finished()
    with ocp.CheckpointManager(epath.Path("gs://bucket/run"), options=options) as mngr:
        assert mngr.all_steps() == [2, 3]
        restored = mngr.restore(3, args=ocp.args.StandardRestore(tree))
    assert _tree_equal(restored, jax.tree.map(lambda x: x + 3, tree))
    assert sorted(os.listdir(fake_gcs / "bucket" / "run")) == ["2", "3"]


def test_the_fixture_check_catches_a_local_gs_folder(tmp_path):
    fake_gcs_lib.check_no_local_gs_dirs(tmp_path)
    # What os.makedirs("gs://bucket/x") does: a local folder "gs:" with "bucket/x" inside.
    os.makedirs(tmp_path / "sub" / "gs:" / "bucket")
    with pytest.raises(AssertionError, match="gs:"):
        fake_gcs_lib.check_no_local_gs_dirs(tmp_path)


def test_install_and_uninstall_restore_the_defaults(tmp_path):
    import fsspec
    from orbax.checkpoint._src.path import gcs_utils

    before = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
    original = gcs_utils.get_kvstore_for_gcs
    with fake_gcs_lib.installed(tmp_path / "root") as root:
        assert type(fsspec.filesystem("gs")).__name__ == "FakeGCSFileSystem"
        assert gcs_utils.get_kvstore_for_gcs("gs://b/x/y") == {"driver": "file", "path": str(root / "b" / "x" / "y")}
        with pytest.raises(RuntimeError, match="already installed"):
            fake_gcs_lib.install(tmp_path / "other")
    assert {p: fsspec.registry.get(p) for p in ("gs", "gcs")} == before
    assert gcs_utils.get_kvstore_for_gcs is original
    assert original("gs://b/x")["driver"] == "gcs"


# ---- paths and images ----------------------------------------------------------------------
def test_atomic_writes(fake_gcs):
    paths.atomic_write_text("gs://bucket/out/a.txt", "first")
    paths.atomic_write_text("gs://bucket/out/a.txt", "second")
    paths.atomic_write_bytes("gs://bucket/out/b.bin", b"\x00\x01")
    paths.save_npy("gs://bucket/out/x.npy", np.arange(6).reshape(2, 3))
    local = fake_gcs / "bucket" / "out"
    assert (local / "a.txt").read_text() == "second"
    assert (local / "b.bin").read_bytes() == b"\x00\x01"
    np.testing.assert_array_equal(np.load(local / "x.npy"), np.arange(6).reshape(2, 3))
    assert sorted(os.listdir(local)) == ["a.txt", "b.bin", "x.npy"]  # no temporary siblings left


def test_atomic_write_failure_keeps_the_old_file(fake_gcs, monkeypatch):
    paths.atomic_write_text("gs://bucket/a.txt", "old")

    with monkeypatch.context() as m:
        m.setattr(type(epath.Path("gs://bucket/a.txt")), "replace", _fail("upload interrupted"))
        with pytest.raises(OSError, match="interrupted"):
            paths.atomic_write_text("gs://bucket/a.txt", "new")
    assert (fake_gcs / "bucket" / "a.txt").read_text() == "old"
    assert os.listdir(fake_gcs / "bucket") == ["a.txt"]


def test_save_grid(fake_gcs):
    x = np.linspace(-1, 1, 4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
    images.save_grid(x, "gs://bucket/grid.png", nrow=2)
    with Image.open(fake_gcs / "bucket" / "grid.png") as img:
        got = np.asarray(img)
    want = images.make_grid(images.to_uint8(x), 2)
    np.testing.assert_array_equal(got, want)


# ---- model directories ---------------------------------------------------------------------
def _fail(message):
    def fail(*args, **kwargs):
        raise OSError(message)

    return fail


def test_model_directory_round_trip_and_safe_overwrite(fake_gcs, monkeypatch):
    uri = "gs://bucket/models/tiny"
    model_store.save_model(uri, CFG, PARAMS, extra={"note": "first"})
    assert model_store.is_model_dir(uri) and model_store.has_model_config(uri)
    assert os.listdir(fake_gcs / "bucket" / "models") == ["tiny"]
    assert sorted(os.listdir(fake_gcs / "bucket" / "models" / "tiny")) == ["model_config.json", "params"]
    cfg, params = model_store.load_model_dir(uri)
    assert cfg == CFG and _tree_equal(params, PARAMS)
    cfg, params = model_store.load_model(uri)
    assert cfg == CFG and _tree_equal(params, PARAMS)

    with pytest.raises(CheckpointError, match="not empty"):
        model_store.save_model(uri, CFG, PARAMS)
    # Saves that fail leave the old model in place and no temporary directory behind:
    # parameters Orbax cannot serialise (refused before anything is written) ...
    bad = {**jax.tree.map(np.asarray, PARAMS), "not_an_array": np.array(["x", "y"])}
    with pytest.raises(ValueError, match="not_an_array.*not a numeric array"):
        model_store.save_model(uri, CFG, bad, overwrite=True)
    # ... and a failure after the parameters were written.
    with monkeypatch.context() as m:
        m.setattr(paths, "atomic_write_text", _fail("upload interrupted"))
        with pytest.raises(OSError, match="interrupted"):
            model_store.save_model(uri, CFG, random_params(CFG, seed=3), overwrite=True)
    assert os.listdir(fake_gcs / "bucket" / "models") == ["tiny"]
    cfg, params = model_store.load_model(uri)
    assert cfg == CFG and _tree_equal(params, PARAMS)
    assert json.loads((fake_gcs / "bucket/models/tiny/model_config.json").read_text())["_note"] == "first"

    other = random_params(CFG, seed=7)
    model_store.save_model(uri, CFG, other, overwrite=True)
    assert _tree_equal(model_store.load_model(uri)[1], other)
    assert os.listdir(fake_gcs / "bucket" / "models") == ["tiny"]


# ---- latents ---------------------------------------------------------------------------------
def _latent_records(n, value=0.0, fail_after=None):
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise RuntimeError("encoder crashed")
        yield {"latent": np.full((2, 2, 4), value + i, np.float32), "label": i % 3, "latent_flipped": np.full((2, 2, 4), -i, np.float32)}


def _values(src):
    return sorted(float(src[i]["image"][0, 0, 0]) for i in range(len(src)))


def test_latents_on_gcs(fake_gcs, tmp_path):
    uri = "gs://bucket/latents"
    meta = data.write_latents(uri, _latent_records(7), num_shards=2, metadata={"classes": ["a", "b", "c"]})
    assert meta["count"] == 7 and data.latents_exist(uri)
    assert sorted(os.listdir(fake_gcs / "bucket" / "latents")) == ["latents-00000-of-00002.array_record", "latents-00001-of-00002.array_record", "latents.json"]
    assert os.listdir(fake_gcs / "bucket") == ["latents"]

    cache = tmp_path / "cache"
    src = data.LatentSource(uri, cache_dir=cache)
    assert len(src) == 7 and src.has_flipped and src.metadata["classes"] == ["a", "b", "c"]
    assert src.paths == [f"{uri}/{n}" for n in meta["shards"]]
    assert all(p.startswith(str(cache)) for p in src.local_paths)
    assert _values(src) == list(range(7))
    # The default cache ($SKIPDIT_CACHE) and a glob over the remote shards read the same.
    assert _values(data.LatentSource(uri)) == list(range(7))
    assert len(os.listdir(tmp_path / "skipdit-cache" / "latents")) == 2
    assert _values(data.LatentSource(uri + "/latents-*.array_record", cache_dir=cache)) == list(range(7))

    # A failing overwrite leaves the old latents readable and unchanged.
    with pytest.raises(RuntimeError, match="encoder crashed"):
        data.write_latents(uri, _latent_records(9, value=100, fail_after=5), num_shards=2, overwrite=True)
    assert os.listdir(fake_gcs / "bucket") == ["latents"]
    assert _values(data.LatentSource(uri, cache_dir=tmp_path / "fresh")) == list(range(7))

    # A complete overwrite replaces them; the cache does not serve the old shards.
    data.write_latents(uri, _latent_records(3, value=100), num_shards=2, overwrite=True)
    assert _values(data.LatentSource(uri, cache_dir=cache)) == [100.0, 101.0, 102.0]
    with pytest.raises(UserError, match="already holds latents"):
        data.write_latents(uri, _latent_records(3))
    with pytest.raises(UserError, match="no latent files"):
        data.LatentSource("gs://bucket/nothing-*.array_record", cache_dir=cache)


# ---- image folders ---------------------------------------------------------------------------
def test_image_folder_source_on_gcs(fake_gcs):
    rng = np.random.default_rng(0)
    local = fake_gcs / "bucket" / "images"
    for name, size in [("cat/a.png", (20, 30)), ("cat/deep/b.jpg", (16, 16)), ("dog/c.PNG", (40, 24))]:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(local / name)
    (local / "dog" / "notes.txt").write_text("not an image")
    remote = data.ImageFolderSource("gs://bucket/images", 16)
    ref = data.ImageFolderSource(local, 16)
    assert remote.classes == ["cat", "dog"] and len(remote) == 3
    assert [p for p, _ in remote.samples] == [p.replace(str(local), "gs://bucket/images") for p, _ in ref.samples]
    for i in range(3):
        np.testing.assert_array_equal(remote[i]["image"], ref[i]["image"])
        assert remote[i]["label"] == ref[i]["label"]
    with pytest.raises(UserError, match="does not exist"):
        data.ImageFolderSource("gs://bucket/missing", 16)


# ---- checkpoint files --------------------------------------------------------------------------
def test_load_torch_checkpoint_from_gcs(fake_gcs):
    torch = pytest.importorskip("torch")
    state = dit_to_torch(CFG, PARAMS)
    save_torch_safetensors(CFG, PARAMS, "gs://bucket/m.safetensors")
    loaded = load_torch_checkpoint("gs://bucket/m.safetensors")
    assert set(loaded) == set(state) and all(np.array_equal(loaded[k], state[k]) for k in state)

    torch.save({"ema": {k: torch.from_numpy(v) for k, v in state.items()}}, fake_gcs / "bucket" / "m.pt")
    loaded = load_torch_checkpoint("gs://bucket/m.pt")
    assert all(np.array_equal(loaded[k], state[k]) for k in state)

    (fake_gcs / "bucket" / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="gs://bucket/bad.pt is not a PyTorch checkpoint"):
        load_torch_checkpoint("gs://bucket/bad.pt")
    with pytest.raises(CheckpointError, match="not found: gs://bucket/nope.pt"):
        load_torch_checkpoint("gs://bucket/nope.pt")


def test_classifier_round_trip_on_gcs(fake_gcs):
    from skipdit_jax.evaluation import mnist_classifier as clf

    params = clf.init_classifier(0, 16)
    clf.save_classifier("gs://bucket/clf", params, {"image_size": 16})
    clf.save_classifier("gs://bucket/clf", params, {"image_size": 16, "note": "again"})
    loaded, meta = clf.load_classifier("gs://bucket/clf")
    assert meta == {"image_size": 16, "note": "again"} and _tree_equal(loaded, params)
    assert os.listdir(fake_gcs / "bucket") == ["clf"]


# ---- the CLI -------------------------------------------------------------------------------------
def test_sample_command_writes_to_gcs(fake_gcs, capsys):
    from skipdit_jax import cli

    model_store.save_model("gs://bucket/model", CFG, PARAMS)
    argv = ["skipdit", "sample", "gs://bucket/model", "--labels", "1,2", "--sampler", "ddim", "--steps", "2", "--cfg_scale", "1", "--out", "gs://bucket/samples"]
    assert cli.main(argv) == 0
    out = fake_gcs / "bucket" / "samples"
    assert sorted(os.listdir(out)) == ["samples.json", "samples.npy", "samples.png"]
    samples = np.load(out / "samples.npy")
    assert samples.shape == (2, 8, 8, 4) and np.isfinite(samples).all()
    assert json.loads((out / "samples.json").read_text())["labels"] == [1, 2]
    assert "gs://bucket/samples/samples.png" in capsys.readouterr().out


def test_convert_in_a_subprocess_with_the_fake_installed(fake_gcs, tmp_path):
    """The way a subprocess (e.g. a training run) uses the fake: install it first."""
    torch = pytest.importorskip("torch")
    (fake_gcs / "bucket").mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in dit_to_torch(CFG, PARAMS).items()}, fake_gcs / "bucket" / "tiny.pt")
    script = (
        f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import fake_gcs; fake_gcs.install({str(fake_gcs)!r}); "
        "from skipdit_jax import cli; "
        "sys.exit(cli.main(['skipdit', 'convert', 'gs://bucket/tiny.pt', 'gs://bucket/converted', '--num_heads', '4']))"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=os.getcwd(), timeout=600)
    assert res.returncode == 0, res.stderr
    assert "converted gs://bucket/tiny.pt -> gs://bucket/converted" in res.stdout
    cfg, params = model_store.load_model("gs://bucket/converted")
    assert cfg == CFG and _tree_equal(params, PARAMS)
