"""The FID Inception against pytorch-fid's own classes (random non-zero weights), its weight
converter and loader, the resize against torch's F.interpolate, sharded extraction on 8
simulated devices and `skipdit convert-inception`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skipdit_jax import cli
from skipdit_jax.errors import CheckpointError, UserError
from skipdit_jax.evaluation import inception as inc

from torch_reference import import_pytorch_fid_inception

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the keys and shapes of pytorch-fid's FID Inception, from
    torchvision's Inception3 (the FID blocks patch only forward(), not the parameters):
    He-scaled conv weights, BN weight/running_var in [0.5, 1.5] (positive), small biases
    and running means, so activations stay O(1) through the network."""
    import_pytorch_fid_inception()
    import torchvision

    g = torch.Generator().manual_seed(seed)
    shapes = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    out = {}
    for key, value in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = value
        elif key.endswith("conv.weight"):
            out[key] = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / value[0].numel())
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif key == "fc.weight":
            out[key] = torch.randn(value.shape, generator=g) / math.sqrt(value.shape[1])
        else:
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
    return out


@functools.lru_cache(maxsize=1)
def _state() -> dict[str, torch.Tensor]:
    return _random_fid_state_dict()


def _numpy_state() -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in _state().items()}


def _close(actual, expected, what):
    # float32 through ~95 convs: observed errors ~1e-6 of the values' scale.
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def test_features_match_pytorch_fid():
    pf = import_pytorch_fid_inception()
    state = _state()
    original = pf.load_state_dict_from_url
    pf.load_state_dict_from_url = lambda *a, **k: state  # fid_inception_v3() loads strictly from it
    try:
        model = pf.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    finally:
        pf.load_state_dict_from_url = original
    mixed_6d = model.blocks[2][6]
    assert isinstance(mixed_6d, pf.FIDInceptionC) and mixed_6d.branch7x7_1.conv.out_channels == 160
    hooked = {}
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: hooked.__setitem__("out", o))
    params = inc.inception_from_torch(_numpy_state())
    fc = state["fc.weight"].numpy()
    rng = np.random.default_rng(0)
    for h, w in ((40, 56), (317, 305)):  # smaller and larger than 299: up- and down-sampling
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        with torch.inference_mode():
            pool = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0][:, :, 0, 0].numpy()
        spatial = hooked["out"].permute(0, 2, 3, 1)[..., :7].reshape(2, -1).numpy()
        out = jax.tree.map(np.asarray, inc.inception_features(params, images))
        assert {k: v.shape for k, v in out.items()} == {"pool": (2, 2048), "logits": (2, 1008), "spatial": (2, 2023)}
        assert all(v.dtype == np.float32 for v in out.values())
        assert pool.std() > 0.1 and spatial.std() > 0.1  # non-trivial activations
        _close(out["pool"], pool, f"pool {h}x{w}")
        _close(out["logits"], pool @ fc.T, f"logits {h}x{w}")
        _close(out["spatial"], spatial, f"spatial {h}x{w}")


@pytest.mark.parametrize("size", [(32, 32), (512, 512), (17, 400)])
def test_resize_matches_torch_interpolate(size):
    images = np.random.default_rng(1).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    expected = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    np.testing.assert_allclose(np.asarray(inc.preprocess(images)), expected.permute(0, 2, 3, 1).numpy(), atol=2e-5)


def test_image_checks():
    params = inc.init_inception(jax.random.key(0))
    with pytest.raises(UserError, match="uint8"):
        inc.inception_features(params, np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
        inc.extract_features(params, np.zeros((1, 8, 8, 1), np.uint8), batch_size=4)


def test_converter_round_trip_and_errors():
    state = _numpy_state()
    params = inc.inception_from_torch(state)
    back = inc.inception_to_torch(params)
    assert set(back) == {k for k in state if not k.endswith("num_batches_tracked")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    assert params["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 32)  # OIHW -> HWIO
    assert params["fc"]["kernel"].shape == (2048, 1008)

    missing = dict(state)
    del missing["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): Mixed_6d\.branch1x1\.bn\.running_var") as e:
        inc.inception_from_torch(missing)
    assert "\n" not in str(e.value)
    extra = {**state, "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): AuxLogits\.fc\.weight"):
        inc.inception_from_torch(extra)
    wrong = {**state, "Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3), np.float32)}
    shape_error = r"Mixed_5b\.branch5x5_2\.conv\.weight has shape \(64, 48, 3, 3\), expected \(64, 48, 5, 5\)"
    with pytest.raises(CheckpointError, match=shape_error):
        inc.inception_from_torch(wrong)

    # Loading a .pth and a .safetensors file: test_convert_inception_cli.


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over tmp_path/www: (base URL, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", www
    finally:
        server.shutdown()
        server.server_close()


def test_load_inception_from_url_checks_sha256_and_caches(tmp_path, served, monkeypatch):
    monkeypatch.setenv("SKIPDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SKIPDIT_INCEPTION", raising=False)
    base, www = served
    params = inc.inception_from_torch(_numpy_state())
    inc.save_inception(params, www / "x.safetensors")
    data = (www / "x.safetensors").read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:8]
    (www / f"pt_inception-{digest}.safetensors").write_bytes(data)
    (www / "pt_inception-00000000.safetensors").write_bytes(data)
    cache = tmp_path / "cache" / "inception"

    with pytest.raises(CheckpointError, match="sha256 prefix 00000000"):
        inc.load_inception(f"{base}/pt_inception-00000000.safetensors")
    assert not (cache / "pt_inception-00000000.safetensors").exists()

    monkeypatch.setenv("SKIPDIT_INCEPTION", f"{base}/pt_inception-{digest}.safetensors")
    jax.tree.map(np.testing.assert_array_equal, inc.load_inception(), params)
    assert (cache / f"pt_inception-{digest}.safetensors").read_bytes() == data
    (www / f"pt_inception-{digest}.safetensors").unlink()  # the second load reads the cache
    jax.tree.map(np.testing.assert_array_equal, inc.load_inception(), params)


def test_load_inception_without_network_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPDIT_CACHE", str(tmp_path))
    url = "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth"  # port 9 (discard): refused
    with pytest.raises(CheckpointError) as e:
        inc.load_inception(url)
    message = str(e.value)
    assert "\n" not in message and url in message and "SKIPDIT_INCEPTION" in message and "skipdit convert-inception" in message
    with pytest.raises(CheckpointError, match="not found.*skipdit convert-inception"):
        inc.load_inception(str(tmp_path / "absent.pth"))


def test_convert_inception_cli(tmp_path, capsys):
    params = inc.inception_from_torch(_numpy_state())
    src = tmp_path / "pt_inception.pth"
    torch.save(_state(), src)
    out = tmp_path / "inception.safetensors"

    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        cli.main(["skipdit", "convert-inception", str(bad), str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("skipdit: error:") and "\n" not in err and str(bad) in err
    assert not out.exists()

    assert cli.main(["skipdit", "convert-inception", str(src), str(out)]) == 0
    jax.tree.map(np.testing.assert_array_equal, inc.load_inception(str(out)), params)

    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["skipdit", "convert-inception", str(bad), str(out), "--overwrite"])
    assert e.value.code == 2 and out.read_bytes() == before  # a bad source never replaces OUT
    with pytest.raises(SystemExit) as e:
        cli.main(["skipdit", "convert-inception", str(src), str(out)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err and out.read_bytes() == before


# argv: OUT.npz [COORDINATOR PROCESS_ID]. One process with 8 simulated devices: 9 images in
# batches of 8 (the last padded: 1 + 7), and the plain single-device features as the
# reference. Two processes of one device each: the first 3 images in batches of 2.
_SHARDED = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    if len(sys.argv) > 2:
        jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[3]))
    from skipdit_jax.evaluation import inception as inc
    two = len(sys.argv) > 2
    assert jax.device_count() == (2 if two else 8), jax.device_count()
    params = inc.init_inception(jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    images = images[:3] if two else images
    out = {"sharded_" + k: v for k, v in inc.extract_features(params, images, batch_size=2 if two else 8).items()}
    if len(sys.argv) == 2:
        out.update({"single_" + k: np.asarray(v) for k, v in inc.inception_features(params, images).items()})
    np.savez(sys.argv[1], **out)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_extract_features_on_8_devices_and_on_2_processes_equals_one_device(tmp_path):
    def env(devices):
        env = dict(os.environ)
        # Without conftest's optimisation level 0: the 299x299 forward passes dominate here
        # and run twice as fast at XLA's default level, which costs ~0.5 s more to compile.
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return env

    coordinator = f"127.0.0.1:{_free_port()}"
    runs = [([str(tmp_path / "eight.npz")], 8)]
    runs += [([str(tmp_path / f"proc{i}.npz"), coordinator, str(i)], 1) for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARDED, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(n), cwd=ROOT,
        )
        for args, n in runs
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:  # a failed process leaves its peer waiting for it
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    eight = np.load(tmp_path / "eight.npz")
    for name in ("eight", "proc0", "proc1"):  # every process gets every row
        got = np.load(tmp_path / f"{name}.npz")
        for k in ("pool", "logits", "spatial"):
            single = eight["single_" + k][: 9 if name == "eight" else 3]
            scale = float(np.abs(single).max())
            width = {"pool": 2048, "logits": 1008, "spatial": 2023}[k]
            assert got["sharded_" + k].shape == single.shape == (len(single), width)
            assert scale > 0.1, (k, scale)
            np.testing.assert_allclose(got["sharded_" + k], single, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{name} {k}")
