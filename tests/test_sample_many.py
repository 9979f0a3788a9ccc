"""sample-many: per-sample determinism (batch size, devices, processes), resume after a
crash with byte-identical output, the fused VAE path, and bad inputs; the sampler's
per-sample keys."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipdit_jax import model_store
from skipdit_jax.cache import SkipCache
from skipdit_jax.diffusion import Diffusion
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import config_to_dict, family_of
from skipdit_jax.sampling import sample, sample_many
from skipdit_jax.sampling.many import FID_PRESET, sample_inputs, write_npz

from helpers import random_params, tiny_config

# A pixel-space model with clip_denoised: samples spread over the whole uint8 range
# (an unclipped random model saturates at 0/255, which would hide differences).
CFG = tiny_config(depth=4, in_channels=3)
PARAMS = random_params(CFG)
RUN = dict(sampler="ddpm", num_steps=4, cfg_scale=1.5, clip_denoised=True, progress=False)
CLI_RUN = ["--sampler=ddpm", "--steps=4", "--cfg_scale=1.5", "--clip_denoised", "--noprogress", "--seed=3"]


def _final(out, num=6, side=8):
    return out / f"samples_{num}x{side}x{side}x3.npz"


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_state(root):
    """Every file under root with its bytes' digest (to show that nothing changed)."""
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the sampler's per-sample keys ----------------------------------------------------------------
def test_per_sample_keys_do_not_depend_on_the_batch_and_one_key_is_unchanged():
    cfg, params = CFG, PARAMS
    noise = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    labels = jnp.array([1, 7, 3])
    keys = jax.random.split(jax.random.key(5), 3)
    kw = dict(sampler="ddpm", num_steps=3, cfg_scale=1.0)
    together = np.asarray(sample(cfg, params, noise=noise, labels=labels, rng=keys, **kw))
    for b in (0, 2):
        alone = np.asarray(sample(cfg, params, noise=noise[b : b + 1], labels=labels[b : b + 1], rng=keys[b : b + 1], **kw))
        np.testing.assert_allclose(alone[0], together[b], rtol=1e-5, atol=1e-5)
    # Sample 1's output is its own: other neighbours leave it as it is.
    swapped = np.asarray(sample(cfg, params, noise=noise[::-1], labels=labels[::-1], rng=keys[::-1], **kw))
    np.testing.assert_allclose(swapped[1], together[1], rtol=1e-5, atol=1e-5)

    # One key: the step noise is split from it step by step, as before (an independent loop).
    key = jax.random.key(9)
    one = np.asarray(sample(cfg, params, noise=noise, labels=labels, rng=key, **kw))
    family, diffusion = family_of(cfg), Diffusion("3", learn_sigma=cfg.learn_sigma)
    apply, x = jax.jit(family.apply), noise
    for i in range(diffusion.num_steps)[::-1]:
        t = jnp.full((3,), int(diffusion.timestep_map[i]), jnp.int32)
        out = apply(params, x, t, labels)
        key, sub = jax.random.split(key)
        x = diffusion.ddpm_step(out, x, jnp.full((3,), i, jnp.int32), jax.random.normal(sub, x.shape), False)
    np.testing.assert_allclose(one, np.asarray(x), rtol=1e-4, atol=1e-4)
    assert np.abs(one - together).max() > 1e-2  # the two kinds of rng really differ
    with pytest.raises(UserError, match="2 per-sample keys for a batch of 3"):
        sample(cfg, params, noise=noise, labels=labels, rng=keys[:2], **kw)


# ---- the library: batch size, resume, VAE ---------------------------------------------------------
def test_samples_do_not_depend_on_the_batch_size(tmp_path):
    sample_many(CFG, PARAMS, tmp_path / "b4", num=6, batch_size=4, seed=3, **RUN)
    sample_many(CFG, PARAMS, tmp_path / "b2", num=6, batch_size=2, seed=3, **RUN)
    sample_many(CFG, PARAMS, tmp_path / "first3", num=3, batch_size=1, seed=3, **RUN)
    a = np.load(_final(tmp_path / "b4"))
    images, labels = a["arr_0"], a["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 3) and labels.dtype == np.int64
    assert np.unique(images).size > 100 and len(set(labels.tolist())) > 2  # real images, labels drawn
    # Equal arrays and deterministic zips: the two files are the same bytes.
    assert _digest(_final(tmp_path / "b2")) == _digest(_final(tmp_path / "b4"))
    alone = np.load(_final(tmp_path / "first3", 3))
    np.testing.assert_array_equal(alone["arr_0"], images[:3])
    np.testing.assert_array_equal(alone["arr_1"], labels[:3])
    # Another seed, other noise and labels for the same indices.
    idx = jnp.arange(64)
    (z3, y3, _), (z4, y4, _) = (sample_inputs(seed, idx, (8, 8, 3), None, 10) for seed in (3, 4))
    assert float(jnp.abs(z3 - z4).mean()) > 0.5 and (y3 != y4).mean() > 0.5
    settings = json.loads((tmp_path / "b4" / "settings.json").read_text())
    assert settings["seed"] == 3 and settings["respacing"] == "4" and len(settings["model_fingerprint"]) == 16
    assert not (tmp_path / "b4" / "shards").exists()  # merged into the final file


def test_crash_then_resume_gives_the_same_bytes(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    sample_many(CFG, PARAMS, ref, num=6, batch_size=2, cache=SkipCache(2, 1), png=True, compare=False, **RUN)
    with pytest.raises(RuntimeError, match="test hook"):
        sample_many(CFG, PARAMS, out, num=6, batch_size=2, cache=SkipCache(2, 1), _stop_after=2, **RUN)
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == ["00000000-00000002.npz", "00000002-00000004.npz"] and not _final(out).exists()
    (out / "shards" / "00000002-00000004.npz").write_bytes(b"PK\x03\x04 torn")  # damaged: redrawn
    summary = sample_many(CFG, PARAMS, out, num=6, batch_size=2, cache=SkipCache(2, 1), png=True, keep_shards=True, **RUN)
    assert summary["images"] == 4  # only the damaged and the missing shard
    assert summary["measured_speedup"] > 0 and 0 <= summary["outside_fraction"] < 1
    assert _digest(_final(out)) == _digest(_final(ref))
    assert sorted(p.name for p in (out / "png").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    assert _digest(out / "png" / "000005.png") == _digest(ref / "png" / "000005.png")
    # A finished directory: nothing to draw, nothing rewritten.
    before = _tree_state(out)
    assert sample_many(CFG, PARAMS, out, num=6, batch_size=2, cache=SkipCache(2, 1), png=True, keep_shards=True, **RUN)["images"] == 0
    after = _tree_state(out)
    assert {k: v for k, v in after.items() if k != "summary.json"} == {k: v for k, v in before.items() if k != "summary.json"}


def test_deterministic_npz_reads_back_with_numpy(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x.npz"
    with open(path, "wb") as f:
        write_npz(f, {"arr_0": ((4, 3, 4), np.uint8, [a, a + 1]), "arr_1": np.array([3, 4])})
    z = np.load(path)
    np.testing.assert_array_equal(z["arr_0"], np.concatenate([a, a + 1]))
    np.testing.assert_array_equal(z["arr_1"], [3, 4])
    with open(tmp_path / "y.npz", "wb") as f:
        write_npz(f, {"arr_0": np.concatenate([a, a + 1]), "arr_1": np.array([3, 4])})
    assert _digest(path) == _digest(tmp_path / "y.npz")
    np.savez(tmp_path / "ref.npz", arr_0=np.concatenate([a, a + 1]), arr_1=np.array([3, 4]))  # same members as numpy's
    assert sorted(np.load(tmp_path / "ref.npz").files) == sorted(z.files)


# ---- devices, processes and the command line ------------------------------------------------------
def _tiny_vae_dir(root):
    """A diffusers-layout VAE folder (config.json + safetensors) with random weights."""
    from safetensors.numpy import save_file

    from skipdit_jax.encoders.vae import VAEConfig, diffusers_key_shapes

    meta = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 3}
    rng = np.random.default_rng(0)
    shapes = diffusers_key_shapes(VAEConfig.from_diffusers_config(meta))
    root.mkdir()
    save_file({k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}, str(root / "diffusion_pytorch_model.safetensors"))
    (root / "config.json").write_text(json.dumps(meta))
    return root


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs `skipdit sample-many` in this process for each argv of sys.argv[1] (JSON) and prints
# each exit status and stderr's last line.
_DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from skipdit_jax.cli import main
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = main(["skipdit", "sample-many", *argv])
            except SystemExit as e:
                code = e.code
        print("RESULT", code, (err.getvalue().strip().splitlines() or [""])[-1], flush=True)
    """
)


def _driver(runs, env_devices=None, extra_env=None):
    env = dict(os.environ)
    if env_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={env_devices}").strip()
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(runs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _results(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return [line.split(" ", 2)[1:] for line in out.splitlines() if line.startswith("RESULT ")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """model/: CFG and PARAMS; uncond/: only the config of an unconditional model (every
    error about it comes before any weights are read)."""
    root = tmp_path_factory.mktemp("models")
    model_store.save_model(root / "model", CFG, PARAMS)
    (root / "uncond").mkdir()
    (root / "uncond" / model_store.CONFIG_FILE).write_text(json.dumps(config_to_dict(tiny_config(depth=2, num_classes=0))))
    return root


def test_eight_devices_and_two_processes_write_the_same_npz_as_one_device(tmp_path, model_dir):
    """DDPM + guidance on 2 channels + SkipCache + a (3-channel) VAE decode, fused: one device (here),
    8 devices (one process) and 2 processes x 2 devices give the same bytes."""
    vae = _tiny_vae_dir(tmp_path / "vae")
    args = [str(model_dir / "model"), "--num=12", "--batch_size=8", "--cfg_channels=2", "--cache=2,1", f"--vae={vae}", "--nocompare", *CLI_RUN]
    port = _free_port()
    dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [_driver([[*args, f"--out={tmp_path / 'eight'}"], [*args, "--batch_size=12", f"--out={tmp_path / 'bad'}"]], env_devices=8)]
    procs += [_driver([[*args, f"--out={tmp_path / 'procs'}", *dist, f"--process_id={i}"]], env_devices=2) for i in range(2)]
    from skipdit_jax.cli import main

    assert main(["skipdit", "sample-many", *args, f"--out={tmp_path / 'one'}"]) == 0
    eight, procs0, procs1 = (_results(p) for p in procs)
    assert eight[0][0] == "0" and procs0[0][0] == "0" and procs1[0][0] == "0", (eight, procs0, procs1)
    assert eight[1][0] == "2" and "--batch_size 12 is not a positive multiple of the 8 devices; use 8 or 16" in eight[1][1]
    assert not (tmp_path / "bad").exists()
    one = _final(tmp_path / "one", 12, 16)
    z = np.load(one)
    assert z["arr_0"].shape == (12, 16, 16, 3) and np.unique(z["arr_0"]).size > 50
    summary = json.loads((tmp_path / "eight" / "summary.json").read_text())
    assert summary["devices"] == 8 and summary["images"] == 12
    assert json.loads((tmp_path / "procs" / "summary.json").read_text())["processes"] == 2
    assert _digest(_final(tmp_path / "eight", 12, 16)) == _digest(one)
    assert _digest(_final(tmp_path / "procs", 12, 16)) == _digest(one)


def _cli_error(capsys, *argv):
    from skipdit_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["skipdit", "sample-many", *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("skipdit: error:"), lines
    return lines[0]


def test_bad_inputs_are_one_line_and_touch_nothing(tmp_path, model_dir, capsys):
    model, uncond, out = str(model_dir / "model"), str(model_dir / "uncond"), tmp_path / "out"
    common = ["--num=2", "--batch_size=2", "--sampler=ddim", "--steps=2", "--noprogress", "--nocompare"]
    assert "--num must be >= 1" in _cli_error(capsys, model, f"--out={out}", "--num=0")
    assert "--num is required" in _cli_error(capsys, model, f"--out={out}")
    assert "unknown preset 'fid10k'" in _cli_error(capsys, model, f"--out={out}", "--preset=fid10k")
    assert "--out is required" in _cli_error(capsys, model, "--num=2")
    assert "unconditional: drop --classes" in _cli_error(capsys, uncond, f"--out={out}", *common, "--classes=1")
    # The preset's guidance needs labels (explicit flags still win over it).
    assert "needs a conditional model" in _cli_error(capsys, uncond, f"--out={out}", "--preset=fid50k")
    assert "class ids in 0..9" in _cli_error(capsys, model, f"--out={out}", *common, "--classes=3,10")
    assert "cfg_channels" in _cli_error(capsys, model, f"--out={out}", *common, "--cfg_scale=2", "--cfg_channels=4")
    assert "unknown cache method" in _cli_error(capsys, model, f"--out={out}", *common, "--cache=fastcache:2")
    assert "--seed" in _cli_error(capsys, model, f"--out={out}", *common, "--seed=-1")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    assert "not a directory" in _cli_error(capsys, model, f"--out={tmp_path / 'file'}", *common)

    from skipdit_jax.cli import main

    assert main(["skipdit", "sample-many", model, f"--out={out}", *common, "--cfg_scale=2", "--keep_shards"]) == 0
    capsys.readouterr()
    before = _tree_state(out)
    line = _cli_error(capsys, model, f"--out={out}", *common, "--cfg_scale=3", "--keep_shards")
    assert "other settings (cfg_scale: 2.0 -> 3.0)" in line
    assert _tree_state(out) == before


def test_fid_preset_is_the_official_setting():
    from skipdit_jax.commands import sample_many as command
    from absl import flags

    fv = flags.FlagValues()
    command.define_flags(fv)
    fv(["x", "--preset=fid50k", "--steps=10"])
    s = command.resolve(fv)
    assert s == {**FID_PRESET, "steps": 10}
    assert FID_PRESET == {"sampler": "ddpm", "steps": 250, "cfg_scale": 1.5, "cfg_channels": 3, "num": 50000, "vae": "hf://stabilityai/sd-vae-ft-ema"}


_FSDP_DRIVER = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from helpers import random_params, tiny_config
    from skipdit_jax import sharding
    from skipdit_jax.models.families import family_of
    from skipdit_jax.sampling import many

    cfg = tiny_config()
    params = random_params(cfg)
    mesh = sharding.make_mesh(2, 4)
    fsdp = jax.device_put(params, sharding.param_shardings(params, mesh, param_axes=family_of(cfg).param_axes, min_shard_size=16))
    fn = many.make_batch_fn(cfg, mesh, seed=0, sampler="ddim", respacing="ddim4")
    idx = jax.device_put(np.arange(8, dtype=np.int32), sharding.batch_sharding(mesh))
    a, _ = fn(fsdp, None, idx)
    b, _ = fn(jax.device_put(params, sharding.replicated(mesh)), None, idx)
    print(json.dumps({"sharded": sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(fsdp)),
                      "equal": bool(np.array_equal(np.asarray(a), np.asarray(b)))}))
    """
)


def test_batch_function_takes_fsdp_sharded_weights():
    """In-loop FID samples from the trainer's FSDP-sharded EMA weights as they are (no
    replicated copy on every device): the same images as from replicated weights."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _FSDP_DRIVER], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["sharded"] > 0 and out["equal"], out
