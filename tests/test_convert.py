"""Checkpoint conversion: round trips, safe loading, and every malformed input."""

import argparse

import jax
import numpy as np
import pytest
import torch

from skipdit_jax import model_store
from skipdit_jax.convert import (
    dit_from_torch,
    dit_to_torch,
    expected_shapes,
    load_torch_checkpoint,
    save_torch_safetensors,
)
from skipdit_jax.errors import CheckpointError

from helpers import random_params, tiny_config

CFG = tiny_config(depth=4, hidden_size=32, num_heads=4)
PARAMS = random_params(CFG)


def _state():
    return dit_to_torch(CFG, PARAMS)


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("long_skip", [True, False])
def test_round_trip_through_torch_layout(long_skip):
    cfg = CFG.replace(long_skip=long_skip)
    params = random_params(cfg)
    state = dit_to_torch(cfg, params)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(cfg)
    cfg2, params2 = dit_from_torch(state, num_heads=cfg.num_heads)
    assert cfg2 == cfg
    assert _tree_equal(params, params2)


def test_safetensors_export_round_trip(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_torch_safetensors(CFG, PARAMS, path)
    cfg2, params2 = dit_from_torch(load_torch_checkpoint(path), num_heads=4)
    assert cfg2 == CFG and _tree_equal(PARAMS, params2)


def test_exported_weights_load_in_torch_strictly(tmp_path):
    from safetensors.torch import load_file

    from torch_reference import TorchDiT

    path = str(tmp_path / "model.safetensors")
    save_torch_safetensors(CFG, PARAMS, path)
    ref = TorchDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_classes=10, long_skip=True)
    ref.load_state_dict(load_file(path), strict=True)


def test_model_directory_round_trip(tmp_path):
    model_store.save_model(tmp_path / "m", CFG, PARAMS)
    cfg2, params2 = model_store.load_model(str(tmp_path / "m"))
    assert cfg2 == CFG and _tree_equal(jax.tree.map(np.asarray, params2), PARAMS)
    with pytest.raises(CheckpointError, match="not empty"):
        model_store.save_model(tmp_path / "m", CFG, PARAMS)


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"ema": {k: torch.from_numpy(v) for k, v in _state().items()}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_torch_checkpoint(str(path))
    assert not marker.exists()


def test_namespace_args_are_allowed(tmp_path):
    sd = {k: torch.from_numpy(v) for k, v in _state().items()}
    path = tmp_path / "train.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2", lr=1e-4)}, path)
    assert set(load_torch_checkpoint(str(path))) == set(sd)


def _good_pt(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({k: torch.from_numpy(v) for k, v in _state().items()}, good)
    return good.read_bytes()


def _zip_without_checkpoint():
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"garbage")
    return buf.getvalue()


def _pickle_of(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


UNREADABLE = {
    "empty.pt": (lambda tmp: b"", "is empty"),
    "text.pt": (lambda tmp: b"model weights, honest\n", "not a PyTorch checkpoint"),
    "random.pt": (lambda tmp: np.random.default_rng(0).bytes(4096), "not a PyTorch checkpoint"),
    "random-pickle-head.pt": (lambda tmp: b"\x80\x02" + np.random.default_rng(1).bytes(4096), "not a readable PyTorch checkpoint"),
    "truncated.pt": (lambda tmp: _good_pt(tmp)[: len(_good_pt(tmp)) // 2], "not a readable PyTorch checkpoint"),
    "other.zip.pt": (lambda tmp: _zip_without_checkpoint(), "not a readable PyTorch checkpoint"),
    "list.pt": (lambda tmp: _pickle_of([1, 2, 3]), "does not hold a state dict"),
    "intkeys.pt": (lambda tmp: _pickle_of({0: torch.zeros(2)}), "key 0 is not a string"),
    "nontensor.pt": (lambda tmp: _pickle_of({"w": [1.0]}), "entry 'w' is a list, not a tensor"),
    "empty.safetensors": (lambda tmp: b"", "not a readable safetensors file"),
    "text.safetensors": (lambda tmp: b"just some text in a file", "not a readable safetensors file"),
    "badheader.safetensors": (lambda tmp: (16).to_bytes(8, "little") + b"{not json at all", "not a readable safetensors file"),
    "hugeheader.safetensors": (lambda tmp: (1 << 60).to_bytes(8, "little") + b"{}", "not a readable safetensors file"),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_files_give_one_clear_line(tmp_path, name):
    make, message = UNREADABLE[name]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    with pytest.raises(CheckpointError, match=message) as info:
        load_torch_checkpoint(str(path))
    text = str(info.value)
    assert str(path) in text and "\n" not in text and len(text) < 400


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_torch_safetensors(CFG, PARAMS, str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_torch_checkpoint(str(path))


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_torch_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a model directory"):
        model_store.load_model(str(tmp_path))


@pytest.mark.parametrize(
    "text, message",
    [("[1, 2, 3]", "found a JSON list"), ("{not json", "not valid JSON"), ('{"bogus_key": 1}', "unknown model config keys: bogus_key"), ('"dit"', "found a JSON str")],
)
def test_bad_model_config_files(tmp_path, text, message):
    model_store.save_model(tmp_path / "m", CFG, PARAMS)
    (tmp_path / "m" / model_store.CONFIG_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        model_store.load_model(str(tmp_path / "m"))


def test_failed_save_keeps_the_old_model_directory(tmp_path, monkeypatch):
    from skipdit_jax import paths

    model_store.save_model(tmp_path / "m", CFG, PARAMS)
    bad = {**jax.tree.map(np.asarray, PARAMS), "label": np.array(["a", "b"])}
    with pytest.raises(ValueError, match="not a numeric array"):
        model_store.save_model(tmp_path / "m", CFG, bad, overwrite=True)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(paths, "atomic_write_text", fail)  # after the parameters are written
    with pytest.raises(OSError, match="disk full"):
        model_store.save_model(tmp_path / "m", CFG, random_params(CFG, seed=5), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    cfg2, params2 = model_store.load_model(str(tmp_path / "m"))
    assert cfg2 == CFG and _tree_equal(jax.tree.map(np.asarray, params2), PARAMS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        model_store.save_model(tmp_path / "file", CFG, PARAMS, overwrite=True)


def test_missing_file_and_offline_hub(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_torch_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="Hugging Face Hub"):
        load_torch_checkpoint("hf://facebook/DiT-XL-2-256/DiT-XL-2-256x256.pt")


def test_missing_unexpected_and_misshaped_keys_are_named():
    state = _state()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    state["blocks.2.attn.proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(CheckpointError) as e:
        dit_from_torch(state, num_heads=4)
    msg = str(e.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "blocks.0.extra.weight" in msg and "blocks.2.attn.proj.weight (32, 31)" in msg


def test_heads_are_required_and_presets_are_checked():
    with pytest.raises(CheckpointError, match="num_heads or a preset"):
        dit_from_torch(_state())
    with pytest.raises(CheckpointError, match="does not match preset DiT-XL/2"):
        dit_from_torch(_state(), preset="DiT-XL/2")
    with pytest.raises(CheckpointError, match="not divisible"):
        dit_from_torch(_state(), num_heads=5)


def test_not_a_dit_and_bad_pos_embed():
    with pytest.raises(CheckpointError, match="not a DiT checkpoint"):
        dit_from_torch({"weight": np.zeros(3)}, num_heads=4)
    state = _state()
    state["pos_embed"] = state["pos_embed"] + 0.1
    with pytest.raises(CheckpointError, match="pos_embed"):
        dit_from_torch(state, num_heads=4)


def test_architecture_inference():
    cfg = tiny_config(depth=4, hidden_size=48, num_heads=3, patch_size=4, input_size=16, num_classes=7, learn_sigma=False, long_skip=False)
    cfg2, _ = dit_from_torch(dit_to_torch(cfg, random_params(cfg)), num_heads=3)
    assert cfg2 == cfg
