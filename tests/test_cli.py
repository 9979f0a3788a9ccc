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
    assert (out / "samples.png").stat().st_size > 0
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


@pytest.mark.parametrize(
    "args,needle",
    [
        (["convert", "{missing}", "{tmp}/out", "--num_heads", "4"], "not found"),
        (["convert", "{ckpt}", "{tmp}/out"], "num_heads"),
        (["convert", "{ckpt}"], "expected SRC and OUT_DIR"),
        (["sample", "{ckpt}", "--num_heads", "4", "--labels", "1,99"], "labels must be class ids"),
        (["sample", "{ckpt}", "--num_heads", "4", "--cache", "0"], "interval"),
        (["sample", "{ckpt}", "--num_heads", "4", "--cache", "2,3", "--labels", "1"], "shallow_blocks"),
        (["sample", "{ckpt}", "--num_heads", "4", "--cache", "2,1,10,20"], "close_t"),
        (["sample", "{ckpt}", "--num_heads", "4", "--labels", "a,b"], "--labels"),
        (["sample", "{ckpt}", "--bogus_flag", "1"], "bogus_flag"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_user_errors_are_one_line(official_file, tmp_path, args, needle):
    fill = dict(missing=tmp_path / "missing.pt", tmp=tmp_path, ckpt=official_file)
    res = skipdit(*[a.format(**fill) for a in args])
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("skipdit: error:") and needle in lines[0]
    assert "Traceback" not in res.stderr
