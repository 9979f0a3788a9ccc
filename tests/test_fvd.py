"""FVD: the Flax I3D against an independent PyTorch I3D (random non-zero weights), the
TorchScript reader (no code from the archive runs), the weight layouts and convert-i3d,
the FVD statistics against StyleGAN-V's formula, the official clip selection, and
`skipdit evaluate` on videos."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_i3d_reference import Detector, TorchI3D, detector_features, randomize_, to_hassony2

from skipdit_jax import cli
from skipdit_jax.errors import CheckpointError, UserError
from skipdit_jax.evaluation import fvd, i3d, video_torchscript


def _state(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _rel_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


# ---- the network -------------------------------------------------------------------------------


def test_i3d_matches_torch_reference(monkeypatch):
    """The whole feature path (x / 255 * 2 - 1, bilinear resize, every layer with TF-SAME
    padding on sizes the strides do not divide, folded BatchNorm, average pool, logits, time
    mean) through the sharded `extract_features` (3 videos in batches of 2: padded and
    trimmed) equals the PyTorch reference detector on converted piergiaj weights. The real
    (2, 7, 7) pool needs 224x224 frames, too slow here: the test resizes to 40x40 and pools
    (2, 2, 2)."""
    monkeypatch.setattr(i3d, "INPUT_SIZE", 40)
    monkeypatch.setattr(i3d, "POOL_WINDOW", (2, 2, 2))
    i3d._jitted_on.cache_clear()  # programs traced with the shrunken network stay in this test
    try:
        model = randomize_(TorchI3D(pool_window=(2, 2, 2)), seed=1)
        params = i3d.i3d_from_torch(_state(model))
        videos = np.random.default_rng(0).integers(0, 256, (3, 11, 34, 42, 3), dtype=np.uint8)
        want = detector_features(model, videos, size=40)
        got = i3d.extract_features(params, videos, batch_size=2)
    finally:
        i3d._jitted_on.cache_clear()
    assert got.shape == (3, 400) and got.dtype == np.float32
    assert np.abs(want).max() > 1 and _rel_err(got, want) < 1e-4
    # The videos give different features (the comparison is not vacuous).
    assert np.abs(want[0] - want[1]).max() > 1e-2 * np.abs(want).max()


def test_preprocess_matches_detector_rescale_and_resize():
    """uint8 -> x / 255 * 2 - 1 -> trilinear resize to 224 keeping time (torch's
    F.interpolate, align_corners=False), as the detector with rescale=True, resize=True."""
    videos = np.random.default_rng(1).integers(0, 256, (2, 9, 20, 28, 3), dtype=np.uint8)
    x = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 255 * 2 - 1
    want = torch.nn.functional.interpolate(x, size=(9, 224, 224), mode="trilinear", align_corners=False)
    got = np.asarray(i3d.preprocess(videos))
    assert got.shape == (2, 9, 224, 224, 3)
    assert np.abs(got - want.permute(0, 2, 3, 4, 1).numpy()).max() < 1e-5
    same = np.asarray(i3d.preprocess(videos[:, :, :1, :1].repeat(224, 2).repeat(224, 3)))
    assert np.allclose(same, videos[:, :, :1, :1].repeat(224, 2).repeat(224, 3) / 255 * 2 - 1, atol=1e-6)


def test_i3d_input_checks():
    params = {}
    for bad, message in [
        (np.zeros((2, 16, 8, 8), np.uint8), "shape"),
        (np.zeros((2, 16, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((2, 8, 8, 8, 3), np.uint8), "at least 9 frames"),
    ]:
        with pytest.raises(UserError, match=message):
            i3d.i3d_features(params, bad)


# ---- weights -------------------------------------------------------------------------------------


def _tf_named_module(state: dict) -> torch.nn.Module:
    """The same weights under TF-Hub-like names no loader knows (conv_3d.w, batch_norm.beta /
    moving_mean / moving_variance, no BatchNorm scale), in network order."""
    root = torch.nn.Module()
    for n, key in enumerate(k for k in state if k.endswith("conv3d.weight")):
        unit_key = key[: -len(".conv3d.weight")]
        unit, conv = torch.nn.Module(), torch.nn.Module()
        conv.register_parameter("w", torch.nn.Parameter(torch.from_numpy(state[key])))
        if unit_key == "logits":
            conv.register_parameter("b", torch.nn.Parameter(torch.from_numpy(state["logits.conv3d.bias"])))
        unit.add_module("conv_3d", conv)
        if unit_key != "logits":
            bn = torch.nn.Module()
            for name, src in (("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var")):
                bn.register_buffer(name, torch.from_numpy(state[f"{unit_key}.bn.{src}"]))
            unit.add_module("batch_norm", bn)
        root.add_module(f"unit_{n:02d}", unit)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = root

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return Wrapper()


def _fold(state: dict) -> dict:
    """piergiaj state dict -> {unit: (kernel * s, bias - mean * s)} in numpy (s = gamma /
    sqrt(var + eps)): the network a frozen archive holds."""
    out = {}
    for key in [k for k in state if k.endswith(".conv3d.weight")]:
        unit = key[: -len(".conv3d.weight")]
        if unit == "logits":
            out[unit], out[unit + ".b"] = state[key], state["logits.conv3d.bias"]
            continue
        s = state[f"{unit}.bn.weight"] / np.sqrt(state[f"{unit}.bn.running_var"] + 1e-3)
        out[unit] = state[key] * s[:, None, None, None, None]
        out[unit + ".b"] = state[f"{unit}.bn.bias"] - state[f"{unit}.bn.running_mean"] * s
    return out


def test_torchscript_archives_read_without_running_code(tmp_path, monkeypatch):
    """A scripted detector (piergiaj names under a prefix), an archive of unknown names
    (matched by order and shape) and a frozen one (weights as constants, BatchNorms folded)
    load to the same network, with torch.jit.load unusable; an archive whose data.pkl
    references another global is refused."""
    detector = randomize_(Detector(), seed=2)
    torch.jit.save(torch.jit.script(detector), tmp_path / "i3d_torchscript.pt")
    torch.jit.save(torch.jit.freeze(torch.jit.script(detector)), tmp_path / "frozen.pt")
    state = _state(detector.i3d)
    for k in [k for k in state if k.endswith(".bn.weight")]:
        state[k] = np.ones_like(state[k])  # TF's I3D has no BatchNorm scale
    torch.jit.save(torch.jit.script(_tf_named_module(state)), tmp_path / "tf_names.pt")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be used")

    monkeypatch.setattr(torch.jit, "load", refuse)
    assert video_torchscript.is_torchscript(str(tmp_path / "i3d_torchscript.pt"))
    want = _state(detector.i3d)
    got = i3d.i3d_to_torch(i3d.load_i3d(str(tmp_path / "i3d_torchscript.pt")))
    assert set(got) == {k for k in want if not k.endswith("num_batches_tracked")}
    assert all(np.array_equal(got[k], want[k]) for k in got)
    got = i3d.i3d_to_torch(i3d.load_i3d(str(tmp_path / "tf_names.pt")))
    assert all(np.array_equal(got[k], state[k]) for k in got)
    frozen, folded = _fold(i3d.i3d_to_torch(i3d.load_i3d(str(tmp_path / "frozen.pt")))), _fold(want)
    assert set(frozen) == set(folded)
    assert all(np.abs(frozen[k] - folded[k]).max() <= 1e-5 * np.abs(folded[k]).max() for k in folded)

    # A data.pkl calling os.system is refused before anything runs.
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match="os.system, outside the allow-list"):
        i3d.load_i3d(str(evil))
    assert not (tmp_path / "pwned").exists()


def run_cli(*args):
    try:
        return cli.main(["skipdit", *map(str, args)])
    except SystemExit as e:
        return e.code


def test_convert_i3d_layouts_and_errors(tmp_path, capsys):
    """hassony2 names without BatchNorm weights (TF conversions), torch.save'd -> convert-i3d
    -> the safetensors reloads to the same params; wrong files are one line, exit 2."""
    model = randomize_(TorchI3D(), seed=3)
    want = _state(model)
    hassony2 = {k: torch.from_numpy(v) for k, v in to_hassony2(want).items() if not k.endswith((".batch3d.weight", "tracked"))}
    torch.save({f"module.{k}": v for k, v in hassony2.items()}, tmp_path / "h.pt")
    out = tmp_path / "i3d.safetensors"
    assert run_cli("convert-i3d", tmp_path / "h.pt", out) == 0
    got = i3d.i3d_to_torch(i3d.load_i3d(str(out)))
    for k, v in got.items():
        expect = np.ones_like(v) if k.endswith(".bn.weight") else want[k]
        assert np.array_equal(v, expect), k
    capsys.readouterr()
    del hassony2["mixed_4c.branch_1.1.conv3d.weight"]
    torch.save(hassony2, tmp_path / "broken.pt")
    (tmp_path / "text.pt").write_text("not weights")
    for args, message in [
        ((tmp_path / "h.pt", out), "already exists"),
        ((tmp_path / "broken.pt", tmp_path / "b.safetensors"), "missing keys: Mixed_4c.b1b.conv3d.weight"),
        ((tmp_path / "text.pt", tmp_path / "t.safetensors"), "not a PyTorch checkpoint"),
        ((tmp_path / "h.pt", tmp_path / "x.npz"), "usage"),
    ]:
        assert run_cli("convert-i3d", *args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), (args, err)


# ---- statistics -------------------------------------------------------------------------------------


def _stylegan_v_fvd(a: np.ndarray, b: np.ndarray) -> float:
    """StyleGAN-V's FeatureStats.get_mean_cov and compute_fvd, written out independently."""

    def mean_cov(x):
        x = x.astype(np.float64)
        mean = x.sum(0) / len(x)
        return mean, x.T @ x / len(x) - np.outer(mean, mean)

    (mu_a, s_a), (mu_b, s_b) = mean_cov(a), mean_cov(b)
    root, _ = scipy.linalg.sqrtm(s_a @ s_b, disp=False)
    return float(np.real(np.square(mu_a - mu_b).sum() + np.trace(s_a + s_b - 2 * root)))


def test_fvd_statistics_match_stylegan_v():
    gen = np.random.default_rng(4)
    a = gen.standard_normal((300, 12)).astype(np.float32) * 2
    b = (gen.standard_normal((200, 12)) @ gen.standard_normal((12, 12)) + 0.5).astype(np.float32)
    want = _stylegan_v_fvd(a, b)
    assert want > 1 and abs(fvd.compute_fvd(a, b) - want) < 1e-8 * want
    assert abs(fvd.compute_fvd(a, a)) < 1e-8
    few = a[:9]  # fewer rows than dimensions: the n x n path, either side
    want = _stylegan_v_fvd(few, b)
    assert abs(fvd.compute_fvd(few, b) - want) < 1e-8 * want and abs(fvd.compute_fvd(b, few) - want) < 1e-8 * want
    stats = fvd.fvd_stats(a)
    assert np.allclose(stats.sigma, np.cov(a.astype(np.float64), rowvar=False, bias=True))
    with pytest.raises(UserError, match="n >= 2"):
        fvd.fvd_stats(a[:1])


# ---- clips and the command --------------------------------------------------------------------------


def _write_frames(folder, frames: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:06d}.png")


def _videos(n, frames, seed, size=4):
    gen = np.random.default_rng(seed)
    base = gen.integers(0, 200, (n, 1, size, size, 3))
    return (base + np.arange(frames)[None, :, None, None, None] * 3).astype(np.uint8)


def test_clip_selection_follows_the_official_protocol(tmp_path):
    """Reference clips: random subset, random offset in [0, len - frames * s + s - 1],
    every s-th frame, short videos discarded; samples: first frames; seeded."""
    arr = np.zeros((6, 20, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "v.npz", arr)
    vs = fvd.open_videos(tmp_path / "v.npz")
    rows, idx = fvd.select_clips(vs, num=4, frames=16, subsample=1, random_offset=True, seed=0)
    assert len(rows) == 4 == len(set(rows)) and all(0 <= i[0] <= 4 and np.all(np.diff(i) == 1) for i in idx)
    assert fvd.select_clips(vs, num=4, frames=16, seed=0)[0] == rows
    offsets = {int(i[0]) for s in range(20) for i in fvd.select_clips(vs, num=6, frames=16, seed=s)[1]}
    assert offsets == {0, 1, 2, 3, 4}
    _, idx = fvd.select_clips(vs, num=6, frames=9, subsample=2, random_offset=True, seed=1)
    assert all(np.all(np.diff(i) == 2) and i[-1] <= 19 for i in idx)
    _, idx = fvd.select_clips(vs, num=6, frames=16, random_offset=False)
    assert all(np.array_equal(i, np.arange(16)) for i in idx)
    with pytest.raises(UserError, match="no video has the 32 frames"):
        fvd.select_clips(vs, num=6, frames=16, subsample=2)
    # A folder: frame folders (one too short) and a video file.
    clips = _videos(3, 18, seed=0)
    _write_frames(tmp_path / "real" / "a", clips[0])
    _write_frames(tmp_path / "real" / "b", clips[1][:10])
    from skipdit_jax.videos import write_gif

    write_gif(tmp_path / "real" / "c.gif", clips[2])
    vs = fvd.open_videos(tmp_path / "real")
    assert vs.lengths == [18, 10, 18]
    got = fvd.clips(vs, num=10, frames=16, random_offset=False)
    assert got.shape == (2, 16, 4, 4, 3) and np.array_equal(got[0:1][0], clips[0][:16])


def _stub_features(videos) -> np.ndarray:
    """A cheap deterministic stand-in for the I3D: a fixed projection of each clip's pixels."""
    x = np.asarray(videos, np.float64).reshape(len(videos), -1)
    proj = np.random.default_rng(0).standard_normal((x.shape[1], 400)) / 100
    return (x @ proj).astype(np.float32)


def test_evaluate_command_on_videos(tmp_path, capsys, monkeypatch):
    """sample-many's video .npz against a folder of frame folders: the protocol's clips go
    through the detector, FVD as StyleGAN-V computes it, the reference cached, its statistics
    saved and reusable; bad inputs are one line, exit 2, before any weights load."""
    monkeypatch.setenv("SKIPDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fvd, "_resolve_i3d", lambda spec: ({"w": np.ones(3, np.float32)}, "stub"))
    seen = []

    def extract(params, videos, **kwargs):
        seen.append(videos.shape)
        return _stub_features(videos[:])

    monkeypatch.setattr(i3d, "extract_features", extract)
    samples = _videos(5, 16, seed=1)
    np.savez(tmp_path / "samples.npz", samples, np.arange(5))
    real = _videos(4, 17, seed=2)
    for n, video in enumerate(real):
        _write_frames(tmp_path / "real" / f"v{n}", video)
    out = tmp_path / "m.json"
    args = ("evaluate", tmp_path / "samples.npz", "--ref", tmp_path / "real", "--out", out)
    assert run_cli(*args, "--save_ref_stats", tmp_path / "stats.npz") == 0
    report = json.loads(out.read_text())
    rows, idx = fvd.select_clips(fvd.open_videos(tmp_path / "real"), num=2048, frames=16, seed=0)
    ref_clips = np.stack([real[r][i] for r, i in zip(rows, idx, strict=True)])
    # The formula is checked against StyleGAN-V's above; here: the right clips went through.
    want = fvd.compute_fvd(_stub_features(samples), _stub_features(ref_clips))
    assert abs(report["fvd"] - want) < 1e-6 * want and report["num_samples"] == 5 and report["num_reference"] == 4
    assert "fvd2048_16f" in report["protocol"] and "FVD" in capsys.readouterr().out
    assert seen == [(4, 16, 4, 4, 3), (5, 16, 4, 4, 3)]
    assert run_cli(*args) == 0 and json.loads(out.read_text())["reference_features_cached"]
    assert run_cli("evaluate", tmp_path / "samples.npz", "--ref", tmp_path / "stats.npz", "--out", out) == 0
    assert abs(json.loads(out.read_text())["fvd"] - want) < 1e-6 * want
    assert len(seen) == 4  # the cached and the precomputed reference extract only the samples

    capsys.readouterr()
    np.savez(tmp_path / "short.npz", _videos(3, 8, seed=3))
    np.savez(tmp_path / "float.npz", samples.astype(np.float32))
    np.savez(tmp_path / "rank6.npz", samples[None])
    np.savez(tmp_path / "bad_stats.npz", mu=np.zeros(7), sigma=np.eye(7))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    s = tmp_path / "samples.npz"
    for case, message in [
        ((tmp_path / "short.npz", "--ref", tmp_path / "real"), "no video has the 16 frames"),
        ((tmp_path / "float.npz", "--ref", tmp_path / "real"), "must be uint8"),
        ((tmp_path / "rank6.npz", "--ref", tmp_path / "real"), r"images \(N, H, W, 3\) or videos .* got shape \(1, 5,"),
        ((s, "--ref", tmp_path / "empty"), "holds no videos"),
        ((tmp_path / "empty", "--ref", tmp_path / "real"), "holds no videos"),
        ((s, "--ref", tmp_path / "bad_stats.npz"), "400-d"),
        ((s, "--ref", tmp_path / "real", "--metrics", "fid"), "only video metric is fvd"),
        ((s, "--ref", tmp_path / "real", "--fvd_frames", 4), "at least 9 frames"),
    ]:
        assert run_cli("evaluate", *case, "--out", out) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), (case, err)
    assert len(seen) == 4


_SHARDED = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    if len(sys.argv) > 2:
        jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
    from skipdit_jax.evaluation import i3d

    def cheap_forward(params, videos):  # per-frame means, tiled to 400: the sharding is under test
        m = jnp.mean(videos.astype(jnp.float32), axis=(2, 3, 4)) * params["w"]
        return {"logits": jnp.tile(m, (1, 45))[:, :400]}

    i3d._forward = cheap_forward
    two = len(sys.argv) > 2
    assert jax.device_count() == (2 if two else 8), jax.device_count()
    videos = np.random.default_rng(0).integers(0, 256, (11, 9, 4, 4, 3), dtype=np.uint8)
    videos = videos[:3] if two else videos
    np.save(sys.argv[1], i3d.extract_features({"w": np.float32(2)}, videos, batch_size=2 if two else 8))
    """
)


def test_extract_features_on_8_devices_and_2_processes(tmp_path):
    """Each process feeds only its rows of every global batch; the padded last batch is
    trimmed; every process gets all rows, in order (the network replaced by a cheap one)."""
    root = str(Path(__file__).resolve().parents[1])

    def env(devices):
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        return env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    runs = [([str(tmp_path / "eight.npy")], 8)] + [([str(tmp_path / f"p{i}.npy"), coordinator, str(i)], 1) for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _SHARDED, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env(n), cwd=root)  # fmt: skip
        for a, n in runs
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:  # a failed process leaves its peer waiting
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    videos = np.random.default_rng(0).integers(0, 256, (11, 9, 4, 4, 3), dtype=np.uint8)
    want = np.tile(videos.astype(np.float64).mean(axis=(2, 3, 4)) * 2, (1, 45))[:, :400]
    assert np.allclose(np.load(tmp_path / "eight.npy"), want, rtol=1e-5)
    for i in range(2):
        assert np.allclose(np.load(tmp_path / f"p{i}.npy"), want[:3], rtol=1e-5)
