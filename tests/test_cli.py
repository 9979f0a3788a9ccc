"""`skipdit convert`, `sample` and `export` end to end, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from skipdit_jax.convert import dit_to_torch

from helpers import random_params, tiny_config


def skipdit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "skipdit_jax.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    cfg = tiny_config(depth=6, hidden_size=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-skip.pt"
    sd = {k: torch.from_numpy(v) for k, v in dit_to_torch(cfg, random_params(cfg, scale=0.02)).items()}
    torch.save({"ema": sd}, path)
    return path


def test_convert_sample_export_end_to_end(official_file, tmp_path):
    res = skipdit("convert", official_file, tmp_path / "model", "--num-heads", 4)
    assert res.returncode == 0, res.stderr
    assert "Skip-DiT depth 6" in res.stdout
    out = tmp_path / "samples"
    res = skipdit("sample", tmp_path / "model", "--labels", "1,2,3", "--sampler", "ddim", "--steps", 10, "--cache", "2,1,1000,100", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "predicted speedup" in res.stdout and "measured" in res.stdout
    assert "NOT decoded" in res.stdout  # latent model without a VAE says so
    samples = np.load(out / "samples.npy")
    assert samples.shape == (3, 8, 8, 4) and np.isfinite(samples).all()
    report = json.loads((out / "samples.json").read_text())
    assert report["full_steps"] + report["cached_steps"] == 10
    from PIL import Image

    with Image.open(out / "samples.png") as grid:  # 3 latents of 8x8 in a 2x2 grid (2 px gaps), upscaled 16x
        assert grid.size == (352, 352) and grid.mode == "RGB"
    res = skipdit("export", tmp_path / "model", tmp_path / "back.safetensors")
    assert res.returncode == 0, res.stderr
    from safetensors.numpy import load_file

    original = {k: v.numpy() for k, v in torch.load(official_file, weights_only=True)["ema"].items()}
    exported = load_file(tmp_path / "back.safetensors")
    assert set(exported) == set(original)
    assert all(np.array_equal(exported[k], original[k]) for k in original if k != "pos_embed")


def test_sample_directly_from_official_file(official_file, tmp_path):
    res = skipdit("sample", official_file, "--num_heads", 4, "--labels", "0", "--sampler", "ddim", "--steps", 4, "--cfg_scale", 1, "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "samples.npy").shape == (1, 8, 8, 4)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, official_file):
    """Malformed files for the CLI error test, and a model directory (for the checks that
    must come before the VAE is loaded)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "text.pt").write_text("these are not the weights you are looking for\n")
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(2048))
    good = official_file.read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "bad.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    (d / "listcfg").mkdir()
    (d / "listcfg" / "model_config.json").write_text("[1, 2, 3]")
    (d / "listcfg" / "params").mkdir()
    from skipdit_jax import model_store

    cfg = tiny_config(depth=6, hidden_size=32)
    model_store.save_model(d / "model", cfg, random_params(cfg, scale=0.02))
    return d


@pytest.mark.parametrize(
    "args,needle",
    [
        (["convert", "{missing}", "{tmp}/out", "--num_heads", "4"], "not found"),
        (["convert", "{ckpt}", "{tmp}/out"], "num_heads"),
        (["convert", "{ckpt}"], "expected SRC and OUT_DIR"),
        # Unreadable files: one CheckpointError line each, through convert, sample and export.
        (["convert", "{bad}/text.pt", "{tmp}/out"], "text.pt is not a PyTorch checkpoint"),
        (["sample", "{bad}/text.pt"], "text.pt is not a PyTorch checkpoint"),
        (["convert", "{bad}/empty.pt", "{tmp}/out"], "empty.pt is empty"),
        (["convert", "{bad}/random.pt", "{tmp}/out"], "random.pt is not a PyTorch checkpoint"),
        (["sample", "{bad}/truncated.pt"], "truncated.pt is not a readable PyTorch checkpoint"),
        (["sample", "{bad}/bad.safetensors"], "bad.safetensors is not a readable safetensors file"),
        (["export", "{bad}/bad.safetensors", "{tmp}/x.safetensors"], "not a readable safetensors file"),
        (["convert", "{bad}", "{tmp}/out"], "is a directory, not a checkpoint file"),
        (["sample", "{bad}"], "is not a model directory"),
        (["sample", "{bad}/listcfg"], "does not hold a model config"),
        # Sampling settings. Without --num_heads a checkpoint file cannot even be loaded, and
        # --vae names nothing: these must be refused before either is needed.
        (["sample", "{ckpt}", "--cfg_channels", "0"], "cfg_channels must be >= 1"),
        (["sample", "{ckpt}", "--steps", "0"], "num_steps must be >= 1"),
        (["sample", "{ckpt}", "--cache", "a,b"], "bad cache spec"),
        (["sample", "{ckpt}", "--cache", "0"], "interval"),
        (["sample", "{ckpt}", "--labels", "a,b"], "--labels"),
        (["sample", "{model}", "--cfg_channels", "5", "--vae", "{missing}"], "cfg_channels must be an integer in 1..4"),
        (["sample", "{model}", "--labels", "1,11", "--vae", "{missing}"], "labels must be class ids"),  # 10 = the null label
        (["sample", "{model}", "--labels", "-1", "--vae", "{missing}"], "labels must be class ids"),
        (["sample", "{model}", "--cache", "2,7", "--vae", "{missing}"], "shallow_blocks"),
        (["sample", "{ckpt}", "--num_heads", "4", "--labels", "1,99"], "labels must be class ids"),
        (["sample", "{ckpt}", "--num_heads", "4", "--cache", "2,1,10,20"], "close_t"),
        (["sample", "{ckpt}", "--bogus_flag", "1"], "bogus_flag"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_user_errors_are_one_line(official_file, bad_inputs, tmp_path, args, needle):
    fill = dict(missing=tmp_path / "missing.pt", tmp=tmp_path, ckpt=official_file, bad=bad_inputs, model=bad_inputs / "model")
    res = skipdit(*[a.format(**fill) for a in args], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("skipdit: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "samples").exists()
