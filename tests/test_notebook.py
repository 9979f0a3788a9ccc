"""The Colab notebook (notebooks/skipdit_colab.ipynb): the committed file carries no outputs
and a papermill `parameters` cell; its offline path runs end to end in a fresh kernel of
this interpreter on a tiny model and shows the timing table and the images; then its
ImageNet section runs in the same kernel past the download, on a tiny converted model and
a local VAE (the download and conversion themselves need the network and are not run).

The kernel is launched from a kernelspec written into the test's scratch directory (argv =
this interpreter), so nothing is registered globally and the kernel cannot pick up another
Python. It inherits this process's environment, including the suite's XLA_FLAGS
(tests/conftest.py) and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "skipdit_colab.ipynb"

# The demo's model shrunk as tests/test_demo.py shrinks it: depth 6, 8x8 digits, DDIM-5.
TINY = {
    "model.depth": 6,
    "model.hidden_size": 32,
    "model.num_heads": 2,
    "model.scan_unroll": 1,
    "data.image_size": 8,
    "train.steps": 12,
    "train.global_batch_size": 16,
    "train.log_every": 4,
    "checkpoint.every": 12,
    "optimizer.warmup_steps": 0,
    "sample.every": 0,
    "sample.num_steps": 5,
}
# DDIM-5 visits t = 800, 600, 400, 200, 0; depth 6, k = 2 (4 blocks per cached step), and
# t = 0 <= close_t ends the cache after that step. Counted by hand (as in test_demo.py):
#   N=2: full at steps 0, 2, 4 -> 3 x 6 + 2 x 4 = 26 blocks vs 30
#   N=3, N=4: full at steps 0, 3 / 0, 4 -> 2 x 6 + 3 x 4 = 24 blocks
EXPECTED_PREDICTED = {"Skip-Cache N=2": 30 / 26, "Skip-Cache N=3": 30 / 24, "Skip-Cache N=4": 30 / 24}
EXPECTED_STEPS = {"no cache": "5 / 0", "Skip-Cache N=2": "3 / 2", "Skip-Cache N=3": "2 / 3", "Skip-Cache N=4": "2 / 3"}


def _read():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def _parameters_cell(nb):
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    nb = _read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"code cells {dirty} carry outputs or execution counts; clear them before committing"
    params = _parameters_cell(nb)
    assert params is code[0], "the parameters cell must be the first code cell"
    assigned = {}
    for node in ast.parse(params.source).body:
        assert isinstance(node, ast.Assign), f"the parameters cell holds only assignments, found {ast.dump(node)[:60]}"
        for target in node.targets:
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            for name in names:
                assigned[name.id] = node.value
    for name in ("TRAIN_SECONDS", "SAMPLES_PER_CLASS", "USE_NETWORK", "INSTALL", "WORKDIR", "OVERRIDES"):
        assert name in assigned, f"parameter {name} missing"
    assert ast.literal_eval(assigned["USE_NETWORK"]) is None  # detect by default
    assert ast.literal_eval(assigned["INSTALL"]) is True


def _kernel_manager(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "skipdit-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "skipdit test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="skipdit-test", kernel_spec_manager=ksm)


def _outputs(cells):
    texts, pngs = [], 0
    for cell in cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"cell failed: {out.get('ename')}: {out.get('evalue')}"
            if out.output_type == "stream":
                texts.append(out.text)
            data = out.get("data", {})
            texts += [data[k] for k in ("text/markdown", "text/plain") if k in data]
            pngs += "image/png" in data
    return "\n".join(texts), pngs


def _table(text: str) -> dict[str, list[str]]:
    """The rows of the first timing table in `text`, by sampler name."""
    header = "| sampler | seconds | measured speedup | predicted speedup | full / cached steps | PSNR vs uncached (dB) |"
    assert header in text, "the timing table is missing"
    lines = text[text.index(header):].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _execute(tmp_path, params: dict, then: list[str] = (), cache_dir=None):
    """Execute the notebook in a fresh kernel (working directory tmp_path) with the
    parameters cell replaced by `params`, then, in the same kernel, the extra code cells
    `then`; returns (the executed notebook, the number of its own cells). The kernel is
    shut down at the end whatever happens."""
    nb = _read()
    _parameters_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    own = len(nb.cells)
    nb.cells += [nbformat.v4.new_code_cell(src) for src in then]
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the Hub
    if cache_dir is not None:  # a persistent XLA compilation cache, shared with the other tests' subprocesses
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    km = _kernel_manager(tmp_path)
    client = nbclient.NotebookClient(nb, km=km, timeout=240, resources={"metadata": {"path": str(tmp_path)}})
    try:
        with client.setup_kernel(env=env):
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)  # raises CellExecutionError when the cell fails
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb, own


def _check_rows(rows, expected_predicted, expected_steps):
    assert list(rows) == list(expected_steps)
    for name, (seconds, measured, predicted, steps, psnr_db) in rows.items():
        assert float(seconds) > 0
        assert measured.endswith("x") and float(measured[:-1]) > 0
        assert steps == expected_steps[name]
        if name == "no cache":
            assert predicted == "1.00x" and psnr_db == "n/a"
        else:
            assert float(predicted[:-1]) == pytest.approx(expected_predicted[name], abs=0.006)
            assert 0 < float(psnr_db) < 200  # cached samples differ from the uncached ones, but not wildly


PARAMS = dict(
    TRAIN_SECONDS=20, SAMPLES_PER_CLASS=1, USE_NETWORK=False, INSTALL=False, OVERRIDES=TINY, TIMING_REPEATS=1, SEED=0,
    XL_CHECKPOINT="hf://GuanjieChen/Skip-DiT/DiT-XL-2-skip.pt", XL_VAE="hf://stabilityai/sd-vae-ft-mse",
    XL_CLASSES=[207, 3], XL_SAMPLER="ddim", XL_STEPS=5, XL_CFG=4.0, XL_CACHE_INTERVALS=[2], XL_ON_CPU=False,
)


def _tiny_vae_folder(path: Path) -> None:
    """A diffusers-layout AutoencoderKL folder (config.json + safetensors) with random
    weights: 2x upsampling, 4 latent channels."""
    import numpy as np
    from safetensors.numpy import save_file

    from skipdit_jax.encoders.vae import VAEConfig, diffusers_key_shapes

    cfg = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4)
    rng = np.random.default_rng(0)
    weights = {k: (0.2 * rng.standard_normal(shape)).astype(np.float32) for k, shape in diffusers_key_shapes(VAEConfig(**cfg)).items()}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **cfg}))
    save_file(weights, str(path / "diffusion_pytorch_model.safetensors"))


def test_notebook_runs_offline_then_its_imagenet_section_on_stand_ins(tmp_path, tmp_path_factory):
    """1. The whole notebook offline (USE_NETWORK=False): install skipped, backend,
    training, the MNIST table and grids, the ImageNet section skipped with its reason.
    2. Then, in the same kernel, the ImageNet section's cells again as if online, past the
    download: a tiny latent Skip-DiT already in WORKDIR/skipdit-xl-2 (where the section keeps
    the converted checkpoint) and a local VAE folder stand in for the Hub files."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_params, tiny_config

    from skipdit_jax import model_store

    work = tmp_path / "work"
    # depth 10: k = 4 shallow blocks (the official Skip-Cache setting) needs 5 block pairs.
    xl_config = tiny_config(input_size=4, depth=10, num_heads=2, num_classes=1000, learn_sigma=True)
    model_store.save_model(work / "skipdit-xl-2", xl_config, random_params(xl_config))
    _tiny_vae_folder(tmp_path / "vae")

    section = [c.source for c in _read().cells if c.cell_type == "code" and "RUN_XL" in c.source]
    assert len(section) == 3 and "RUN_XL, why" in section[0]
    online = f"NETWORK, XL_ON_CPU, XL_VAE = True, True, {str(tmp_path / 'vae')!r}"
    cache = tmp_path_factory.getbasetemp() / "jax_cache"  # per test worker
    cache.mkdir(exist_ok=True)
    nb, own = _execute(tmp_path, dict(PARAMS, WORKDIR=str(work)), then=[online, *section], cache_dir=cache)

    # 1. offline
    text, pngs = _outputs(nb.cells[:own])
    assert "skipdit_jax is already importable: nothing to install" in text and "skipdit_jax from" in text
    assert "backend cpu" in text and "network: no (USE_NETWORK)" in text
    assert "Skipping the DiT-XL/2-skip section: no network access" in text
    assert pngs == 2, f"expected the loss plot and the sample grids as images, got {pngs} PNG outputs"
    _check_rows(_table(text), EXPECTED_PREDICTED, EXPECTED_STEPS)
    trained = re.search(r"step (\d+) of 12 ", text)
    assert trained and 1 <= int(trained.group(1)) <= 12
    assert (work / "train" / "metrics.jsonl").is_file()  # trained through the trainer, in WORKDIR
    assert sorted(p.name for p in work.glob("mnist_*.png")) == [
        "mnist_Skip-Cache_N2.png", "mnist_Skip-Cache_N3.png", "mnist_Skip-Cache_N4.png", "mnist_no_cache.png"
    ]

    # 2. the ImageNet section on the stand-ins
    text, pngs = _outputs(nb.cells[own:])
    assert "running the DiT-XL/2-skip section on cpu" in text
    assert f"loaded the converted model from {work / 'skipdit-xl-2'}" in text
    assert pngs == 1, f"expected the ImageNet grids as one image, got {pngs} PNG outputs"
    # DDIM-5 (t = 800 ... 0), depth 10, k = 4, N = 2: full at steps 0, 2, 4 -> 3 x 10 + 2 x 8 = 46 blocks vs 50.
    _check_rows(_table(text), {"Skip-Cache N=2": 50 / 46}, {"no cache": "5 / 0", "Skip-Cache N=2": "3 / 2"})
    assert sorted(p.name for p in work.glob("xl_*.png")) == ["xl_Skip-Cache_N2.png", "xl_no_cache.png"]
    from PIL import Image

    assert Image.open(work / "xl_no_cache.png").size == (2 * (8 + 2) + 2, 8 + 4)  # decoded 8x8 images: 4x4 latents, 2x VAE


def test_install_cell_finds_the_checkout_or_says_what_to_run(tmp_path):
    """The install cell, outside a kernel: `find_checkout` from the notebook's own folder,
    from a folder holding a clone, and nowhere; without the package or a checkout it stops
    with the pip command (run with `python -S`, where the installed package is not importable)."""
    import subprocess

    cell = next(c.source for c in _read().cells if "def find_checkout" in c.source)
    namespace: dict = {}
    exec(cell[: cell.index("\nif importlib.util.find_spec")], namespace)  # imports + find_checkout only
    find_checkout = namespace["find_checkout"]
    assert find_checkout(ROOT / "notebooks") == ROOT
    clone = tmp_path / "content" / "skipdit-jax"
    (clone / "skipdit_jax").mkdir(parents=True)
    (clone / "pyproject.toml").write_text("")
    assert find_checkout(tmp_path / "content") == clone
    assert find_checkout(tmp_path) is None

    res = subprocess.run([sys.executable, "-S", "-c", "INSTALL = True\n" + cell], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "ModuleNotFoundError: skipdit_jax is not installed and no skipdit-jax checkout was found" in res.stderr
    assert "pip install -e PATH/TO/skipdit-jax" in res.stderr
    res = subprocess.run([sys.executable, "-S", "-c", "INSTALL = False\n" + cell], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "INSTALL = False: nothing installed" in res.stdout and "No module named 'skipdit_jax'" in res.stderr
