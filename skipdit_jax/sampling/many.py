"""Large sample sets for FID: deterministic per sample, sharded, resumable, ADM .npz out.

Sample i is a function of (seed, i) alone: with `key_i = fold_in(key(seed), i)` its
initial noise is `normal(fold_in(key_i, NOISE))`, its class label
`randint(fold_in(key_i, LABEL))` (uniform over the classes, as the official
sample_ddp.py draws them) and its sampler noise at step index s
`normal(fold_in(fold_in(key_i, STEP), s))` (the per-sample keys of
`skipdit_jax.sampling.build_sampler`). So which batch, device or process draws a sample
does not change its inputs; the outputs are equal up to XLA's numerics for different
program shapes (the tests measure this). An adaptive cache (TeaCache) decides per batch,
so with it a sample also depends on the other samples of its batch (fixed by the seed
and the batch size, so runs and resumes stay reproducible).

One jitted function per global batch maps sample indices to finished uint8 images (and
labels): noise and labels are drawn on the device, then sampling, the VAE decode and the
official conversion `clip(127.5 * x + 128, 0, 255) -> uint8` run fused, batch-sharded over
a mesh of every device of every process. The host only gathers uint8 batches and writes.

Output directory (process 0 writes, every process computes):

    OUT/settings.json                  everything that determines the bytes (checked on resume)
    OUT/shards/SSSSSSSS-EEEEEEEE.npz   one global batch: images, labels, indices (atomic)
    OUT/samples_{N}x{H}x{W}x3.npz      ADM format: arr_0 uint8 NHWC, arr_1 labels (conditional models)
    OUT/png/000000.png ...             with png=True
    OUT/summary.json                   timings of the last run

A re-run with the same settings redoes only missing or unreadable shards and writes the
same bytes (zip entries carry a fixed timestamp); other settings are one `UserError`
that touches nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import time
import zipfile
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

import skipdit_jax
from skipdit_jax import paths, sharding
from skipdit_jax.errors import UserError
from skipdit_jax.models.families import config_to_dict, family_of
from skipdit_jax.sampling.sampler import build_sampler, check_settings, resolve_respacing, sampling_timesteps

# The official FID-50K settings (DiT / Skip-DiT sample_ddp.py): 250 DDPM steps, guidance
# 1.5 on the first 3 eps channels, labels uniform over the classes, SD VAE (ft-EMA) decode.
FID_PRESET = {
    "sampler": "ddpm",
    "steps": 250,
    "cfg_scale": 1.5,
    "cfg_channels": 3,
    "num": 50000,
    "vae": "hf://stabilityai/sd-vae-ft-ema",
}
PRESETS = {"fid50k": FID_PRESET}

# What each per-sample key is folded with, per purpose.
NOISE, LABEL, STEP = 0, 1, 2
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold: no wall clock in the bytes
SHARDS_DIR, PNG_DIR, SETTINGS_FILE, SUMMARY_FILE = "shards", "png", "settings.json", "summary.json"


def get_preset(name: str | None) -> dict:
    if name is None:
        return {}
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# ---- per-sample randomness and pixels (traceable) ---------------------------------------------
def sample_keys(seed: int, indices: jax.Array) -> jax.Array:
    """key_i = fold_in(key(seed), i) for every index: (B,) typed keys."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)


def sample_inputs(seed: int, indices: jax.Array, sample_shape: tuple[int, ...], classes=None, num_classes: int = 0):
    """(noise (B, *sample_shape) float32, labels (B,) int32 or None, step keys (B,)) of the
    given sample indices. Labels are uniform over `classes` (default: 0..num_classes-1);
    none when num_classes == 0."""
    keys = sample_keys(seed, indices)
    fold = lambda purpose: jax.vmap(lambda k: jax.random.fold_in(k, purpose))(keys)  # noqa: E731
    noise = jax.vmap(lambda k: jax.random.normal(k, sample_shape, jnp.float32))(fold(NOISE))
    labels = None
    if num_classes:
        pool = jnp.arange(num_classes, dtype=jnp.int32) if classes is None else jnp.asarray(classes, jnp.int32)
        labels = pool[jax.vmap(lambda k: jax.random.randint(k, (), 0, pool.shape[0]))(fold(LABEL))]
    return noise, labels, fold(STEP)


def to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] images -> uint8 exactly as the official sample_ddp.py:
    `torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)` (truncation)."""
    return jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


def rgb(x: jax.Array) -> jax.Array:
    """3 channels for the ADM format: a 1-channel image repeated; a latent's channels 0-2
    (undecoded latents: only for tests and benchmarks without a VAE)."""
    return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def pixel_note(channels: int, vae: bool) -> str:
    if vae:
        return "decoded with the VAE"
    if channels in (1, 3):
        return "pixel-space samples" + (" (1 channel repeated to RGB)" if channels == 1 else "")
    return f"latent channels 0-2 of {channels}, NOT decoded images (pass a VAE to decode)"


# ---- the jitted batch function ----------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def make_batch_fn(
    config,
    mesh,
    *,
    seed: int,
    sampler: str,
    respacing: str,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    cache=None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    classes=None,
    vae_config=None,
):
    """A jitted `fn(params, vae_params, indices (B,) int32) -> (images uint8 (B, H, W, 3),
    labels int32 (B,))`, batch-sharded over `mesh`. The weights keep whatever sharding they
    have (replicated, or FSDP-sharded EMA weights during training). Labels are -1 for
    an unconditional model. `vae_params` is None without a VAE. Cached per setting (all
    arguments hashable: `classes` a tuple), so a repeated run reuses the compiled program."""
    family = family_of(config)
    guided = check_settings(config, cache=cache, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    run = build_sampler(config, sampler, respacing, guided, cfg_channels, cache, float(eta), bool(clip_denoised))
    num_classes = config.num_classes if family.is_conditional else 0

    def fn(params, vae_params, indices):
        noise, labels, step_keys = sample_inputs(seed, indices, family.sample_shape, classes, num_classes)
        x = run(params, noise, labels, jnp.float32(cfg_scale), step_keys)
        if vae_config is not None:
            from skipdit_jax.encoders.vae import decode_latents

            x = decode_latents(vae_params, vae_config, x)
        if labels is None:
            labels = jnp.full(indices.shape, -1, jnp.int32)
        return to_uint8(rgb(x)), labels

    batch = sharding.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(None, None, batch), out_shardings=(batch, batch))


def to_global(tree, array_sharding):
    """Host arrays every process holds whole -> global arrays (works across processes)."""

    def put(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, array_sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def gather(x: jax.Array) -> np.ndarray:
    """The whole of a batch-sharded array, on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- deterministic .npz files -----------------------------------------------------------------
def _npy_header(shape, dtype) -> bytes:
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header too long for format 1.0 (what np.save falls back to as well)
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def write_npz(fileobj, arrays: dict) -> None:
    """An uncompressed .npz (what np.savez writes) with fixed zip timestamps, so equal
    arrays give equal bytes. Each value is an array, or (shape, dtype, chunks): C-order
    chunks (arrays) streamed one after another, for arrays too large to hold."""
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            if isinstance(value, tuple):
                shape, dtype, chunks = value
            else:
                value = np.ascontiguousarray(value)
                shape, dtype, chunks = value.shape, value.dtype, [value]
            header = _npy_header(shape, dtype)
            size = len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            written = 0
            with zf.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as out:
                out.write(header)
                for chunk in chunks:
                    data = np.ascontiguousarray(chunk, dtype=dtype).tobytes()
                    out.write(data)
                    written += len(data)
            if written != size - len(header):
                raise ValueError(f"{name}: wrote {written} data bytes for shape {tuple(shape)}")


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    write_npz(buf, arrays)
    return buf.getvalue()


def save_npz(path, arrays: dict) -> None:
    """`write_npz` to `path` atomically (a temporary sibling renamed into place; a remote
    path is built in a local temporary file first, as zip writing needs to seek)."""
    path = paths.as_path(path)
    if paths.is_local(path):
        with paths.written_atomically(path) as tmp, tmp.open("wb") as f:
            write_npz(f, arrays)
        return
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".npz") as f:
        write_npz(f, arrays)
        f.flush()
        paths.copy_file(f.name, path)


# ---- settings and fingerprints ----------------------------------------------------------------
def fingerprint(tree) -> str:
    """sha256 (first 16 hex digits) of a pytree's paths, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run writes: the batches (global batch = shard), the output names."""

    num: int
    batch_size: int
    image_shape: tuple[int, int, int]

    @property
    def num_batches(self) -> int:
        return -(-self.num // self.batch_size)

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.batch_size, min((k + 1) * self.batch_size, self.num)

    def shard_name(self, k: int) -> str:
        lo, hi = self.bounds(k)
        return f"{lo:08d}-{hi:08d}.npz"

    @property
    def final_name(self) -> str:
        h, w, c = self.image_shape
        return f"samples_{self.num}x{h}x{w}x{c}.npz"


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys if old.get(k) != new.get(k)]


def _load_shard(path, plan: Plan, k: int):
    """(images, labels) of a complete shard k, or None if it is missing or unreadable."""
    lo, hi = plan.bounds(k)
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
            images, labels, indices = z["images"], z["labels"], z["indices"]
    except Exception:  # a torn or corrupt file is redone, whatever the error
        return None
    ok = (
        images.dtype == np.uint8 and images.shape == (hi - lo, *plan.image_shape)
        and labels.shape == (hi - lo,) and np.array_equal(indices, np.arange(lo, hi))
    )
    return (images, labels) if ok else None


def _final_ok(path, plan: Plan, conditional: bool) -> bool:
    """A cheap check of an existing final .npz: its members and arr_0's header."""
    try:
        if not path.exists():
            return False
        with path.open("rb") as raw, zipfile.ZipFile(raw) as zf:
            names = sorted(zf.namelist())
            with zf.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
    except Exception:
        return False
    want = ["arr_0.npy", "arr_1.npy"] if conditional else ["arr_0.npy"]
    return names == want and tuple(shape) == (plan.num, *plan.image_shape) and dtype == np.uint8


def _broadcast(array: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(array))


def _agree(error: str | None, todo: np.ndarray) -> np.ndarray:
    """Process 0's verdict (an error line, or the batches to draw) on every process."""
    msg = np.zeros(1024, np.uint8)
    raw = (error or "").encode()[:1024]
    msg[: len(raw)] = np.frombuffer(raw, np.uint8)
    msg = _broadcast(msg)
    text = bytes(msg).rstrip(b"\0").decode(errors="replace")
    if text:
        raise UserError(text if jax.process_index() == 0 or error else f"{text} (process 0)")
    return _broadcast(todo.astype(np.uint8)).astype(bool)


def prepare_out_dir(out, settings: dict, plan: Plan, conditional: bool) -> tuple[np.ndarray, bool]:
    """Check (or create) OUT/settings.json; returns (todo: per-batch bool, final done).
    Process 0 reads and writes, every process gets the same answer. Nothing is deleted."""
    out = paths.as_path(out)
    error, todo, final_done = None, np.ones(plan.num_batches, bool), False
    if jax.process_index() == 0:
        try:
            error = _check_settings_file(out, settings)
            if error is None:
                final_done = _final_ok(out / plan.final_name, plan, conditional)
                if not final_done:
                    shards = out / SHARDS_DIR
                    present = {p.name for p in shards.iterdir()} if shards.is_dir() else set()
                    for k in range(plan.num_batches):
                        name = plan.shard_name(k)
                        todo[k] = name not in present or _load_shard(shards / name, plan, k) is None
                else:
                    todo[:] = False
        except OSError as e:
            error = f"cannot use --out {out}: {e}"
    todo = _agree(error, np.append(todo, final_done))
    return todo[:-1], bool(todo[-1])


def _check_settings_file(out, settings: dict) -> str | None:
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a directory"
    file = out / SETTINGS_FILE
    if file.exists():
        try:
            old = json.loads(file.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            return f"{file} is unreadable ({e}); use another --out"
        diff = _diff(old, settings)
        if diff:
            return f"{out} holds samples drawn with other settings ({'; '.join(diff)}); use another --out or the same settings"
        return None
    ours = [n for n in (SHARDS_DIR, PNG_DIR) if (out / n).exists()]
    ours += [p.name for p in (out.glob("samples_*.npz") if out.exists() else [])]
    if ours:
        return f"{out} holds {', '.join(ours)} but no {SETTINGS_FILE}; use another --out"
    paths.atomic_write_text(file, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return None


# ---- the run ------------------------------------------------------------------------------------
def sample_many(
    config,
    params,
    out,
    *,
    num: int,
    seed: int = 0,
    sampler: str = "ddpm",
    num_steps: int | None = 250,
    respacing: str | None = None,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
    cache=None,
    vae=None,
    vae_spec: str | None = None,
    classes=None,
    clip_denoised: bool = False,
    batch_size: int = 32,
    png: bool = False,
    compare: bool = True,
    keep_shards: bool = False,
    model: str | None = None,
    progress: bool = True,
    mesh=None,
    _stop_after: int | None = None,
) -> dict:
    """Draw `num` samples into the directory `out` (see the module docstring) and return
    the summary (also written to OUT/summary.json).

    `vae` is (VAEConfig, params) or None; `vae_spec` names it in the settings. `classes`
    restricts the labels to these class ids (default: all). `batch_size` is the global
    batch (a multiple of the device count), also the shard size. With a cache and
    `compare`, one batch is timed with and without the cache for the measured speedup.
    `progress`: a progress bar and a line on what the directory already holds (process
    0). `keep_shards`: keep OUT/shards once the final .npz is written. `_stop_after`
    (tests) raises after that many batches, as a crash would.
    """
    family = family_of(config)
    respacing = resolve_respacing(sampler, num_steps, respacing)
    settings = check_run(
        config, num=num, seed=seed, batch_size=batch_size, cfg_scale=cfg_scale, cfg_channels=cfg_channels, cache=cache,
        classes=classes, eta=eta, sampler=sampler,
    )
    vae_config, vae_params = vae if vae is not None else (None, None)
    if vae_config is not None and vae_config.latent_channels != family.eps_channels:
        raise UserError(
            f"the VAE's {vae_config.latent_channels} latent channels do not fit the model's {family.eps_channels} channels"
        )
    h, w = family.sample_shape[:2]
    if vae_config is not None:
        h, w = h * vae_config.downsample_factor, w * vae_config.downsample_factor
    plan = Plan(num, batch_size, (h, w, 3))
    settings.update(
        model_family=family.name,
        model_config=_jsonable(config_to_dict(config)),
        model_fingerprint=fingerprint(params),
        sampler=sampler,
        respacing=respacing,
        eta=float(eta),
        clip_denoised=bool(clip_denoised),
        vae=vae_spec if vae_config is not None else None,
        vae_config=_jsonable(dataclasses.asdict(vae_config)) if vae_config is not None else None,
        vae_fingerprint=fingerprint(vae_params) if vae_config is not None else None,
        image_shape=list(plan.image_shape),
        pixels=pixel_note(family.eps_channels, vae_config is not None),
        platform=jax.devices()[0].platform,
        jax_version=jax.__version__,
    )
    out = paths.as_path(out)
    todo, final_done = prepare_out_dir(out, settings, plan, family.is_conditional)
    main = jax.process_index() == 0
    if main and progress:
        have = plan.num_batches - int(todo.sum())
        print(f"{out}: {have} of {plan.num_batches} shards present" + (", final .npz present" if final_done else ""))

    mesh = mesh or sharding.make_mesh()
    rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    classes = None if classes is None else tuple(int(c) for c in classes)
    kw = dict(seed=seed, sampler=sampler, respacing=respacing, cfg_scale=cfg_scale, cfg_channels=cfg_channels, eta=eta,
              clip_denoised=clip_denoised, classes=classes, vae_config=vae_config)
    summary = {"num": num, "devices": jax.device_count(), "processes": jax.process_count(), "batch_size": batch_size,
               "images": 0, "seconds": 0.0, "images_per_s": None, "compile_seconds": 0.0, "outside_fraction": None,
               "pixels": settings["pixels"], "model": model}
    if todo.any():
        g_params, g_vae = to_global(params, rep), to_global(vae_params, rep)
        idx0 = _indices(plan, int(np.argmax(todo)), batch)
        t0 = time.perf_counter()
        fn = make_batch_fn(config, mesh, cache=cache, **kw).lower(g_params, g_vae, idx0).compile()
        summary["compile_seconds"] = round(time.perf_counter() - t0, 3)
        summary.update(_draw(fn, g_params, g_vae, plan, todo, out, batch, main, progress, _stop_after))
        if cache is not None and compare:
            summary.update(_compare(fn, make_batch_fn(config, mesh, cache=None, **kw), g_params, g_vae, idx0))
            if not getattr(cache, "adaptive", False):  # an adaptive cache's schedule is only known while sampling
                plan_ = cache.plan(sampling_timesteps(sampler, None, respacing), family.depth_units)
                summary["predicted_speedup"] = round(plan_.predicted_speedup, 3)
    if not final_done:
        t0 = time.perf_counter()
        if main:
            _assemble(out, plan, family.is_conditional)
        _barrier("assembled")
        summary["assemble_seconds"] = round(time.perf_counter() - t0, 3)
    if main:
        if png:
            summary["png_written"] = _write_pngs(out, plan)
        if not keep_shards and (out / SHARDS_DIR).exists():
            paths.remove_dir_quietly(out / SHARDS_DIR)  # the final .npz holds them all
        summary["npz"] = str(out / plan.final_name)
        paths.atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def check_run(config, *, num, seed, batch_size, cfg_scale, cfg_channels, cache, classes, eta, sampler) -> dict:
    """Every cheap check of a run's settings (before loading weights or compiling); returns
    the settings that do not need the weights."""
    family = family_of(config)
    if int(num) != num or num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    if not 0 <= int(seed) < 2**31:
        raise UserError(f"--seed must be in 0..2**31-1, got {seed}")
    n_dev = jax.device_count()
    if batch_size < 1 or batch_size % n_dev:
        lower, upper = batch_size // n_dev * n_dev, (batch_size // n_dev + 1) * n_dev
        hint = f"{upper}" if lower < 1 else f"{lower} or {upper}"
        raise UserError(f"--batch_size {batch_size} is not a positive multiple of the {n_dev} devices; use {hint}")
    if len(family.sample_shape) != 3:
        raise UserError(f"sample-many draws images; this model's samples have shape {family.sample_shape}")
    if family.is_conditional and family.condition_kind != "class":
        raise UserError(f"sample-many draws class labels; the {family.name} family is conditioned on {family.condition_kind}")
    if classes is not None:
        if not family.is_conditional:
            raise UserError("this model is unconditional: drop --classes")
        bad = [c for c in classes if not 0 <= int(c) < config.num_classes]
        if not len(classes) or bad:
            raise UserError(f"--classes must be class ids in 0..{config.num_classes - 1}, got {list(classes)}")
    if eta and sampler != "ddim":
        raise UserError("--eta applies to the ddim sampler only")
    if eta < 0:
        raise UserError(f"--eta must be >= 0, got {eta}")
    check_settings(config, cache=cache, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    settings = {
        "num": int(num),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "cfg_scale": float(cfg_scale),
        "cfg_channels": cfg_channels,
        "cache": None if cache is None else {"method": cache.name, **_jsonable(dataclasses.asdict(cache))},
        "classes": None if classes is None else [int(c) for c in classes],
        "labels": "uniform over classes (per-sample key)" if family.is_conditional else None,
        "conversion": "clip(127.5 * x + 128, 0, 255) -> uint8",
        "version": skipdit_jax.__version__,
    }
    return settings


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def _indices(plan: Plan, k: int, batch_sharding) -> jax.Array:
    # Past the end the indices go on (those samples are drawn and dropped), so every batch
    # has the compiled shape.
    lo = k * plan.batch_size
    return to_global(np.arange(lo, lo + plan.batch_size, dtype=np.int32), batch_sharding)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"sample_many:{name}")


def _draw(fn, params, vae_params, plan: Plan, todo, out, batch_sharding, main: bool, progress: bool, stop_after) -> dict:
    from tqdm import tqdm

    done = sum(plan.bounds(k)[1] - plan.bounds(k)[0] for k in np.flatnonzero(~todo))
    bar = tqdm(total=plan.num, initial=done, unit="img", desc="sampling", disable=not (main and progress), smoothing=0.1)
    inside, images, start = 0.0, 0, time.perf_counter()
    for n, k in enumerate(np.flatnonzero(todo)):
        if stop_after is not None and n >= stop_after:
            raise RuntimeError(f"stopped after {n} batches (test hook)")
        idx = _indices(plan, int(k), batch_sharding)
        t0 = time.perf_counter()
        x, y = jax.block_until_ready(fn(params, vae_params, idx))
        inside += time.perf_counter() - t0
        lo, hi = plan.bounds(int(k))
        x, y = gather(x)[: hi - lo], gather(y)[: hi - lo]
        if main:
            save_npz(out / SHARDS_DIR / plan.shard_name(int(k)), {"images": x, "labels": y, "indices": np.arange(lo, hi)})
        images += hi - lo
        bar.update(hi - lo)
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
        "inside_seconds": round(inside, 3),
        "outside_fraction": round(1 - inside / seconds, 4) if seconds > 0 else None,
    }


def _compare(cached_fn, make_uncached, params, vae_params, idx, repeats: int = 3) -> dict:
    """Seconds of one batch without and with the cache (both compiled beforehand), each
    the median of `repeats` runs taken in turns, so a passing load hits both alike."""
    full_fn = make_uncached.lower(params, vae_params, idx).compile()

    def timed(f):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params, vae_params, idx))
        return time.perf_counter() - t0

    runs = [(timed(full_fn), timed(cached_fn)) for _ in range(repeats)]
    t_full, t_cached = (float(np.median(column)) for column in zip(*runs))
    return {
        "full_seconds_batch": round(t_full, 4),
        "cached_seconds_batch": round(t_cached, 4),
        "measured_speedup": round(t_full / t_cached, 3),
    }


def _shard_chunks(out, plan: Plan) -> Iterable[np.ndarray]:
    for k in range(plan.num_batches):
        shard = _load_shard(out / SHARDS_DIR / plan.shard_name(k), plan, k)
        if shard is None:
            raise UserError(f"shard {plan.shard_name(k)} became unreadable while assembling; run again to redraw it")
        yield shard[0]


def _read_member(path, name: str) -> np.ndarray:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
        return z[name]


def _assemble(out, plan: Plan, conditional: bool) -> None:
    """The final ADM .npz from the shards, streamed (never all images in memory)."""
    arrays = {"arr_0": ((plan.num, *plan.image_shape), np.uint8, _shard_chunks(out, plan))}
    if conditional:
        labels = [_read_member(out / SHARDS_DIR / plan.shard_name(k), "labels") for k in range(plan.num_batches)]
        arrays["arr_1"] = np.concatenate(labels).astype(np.int64)
    save_npz(out / plan.final_name, arrays)


def _write_pngs(out, plan: Plan) -> int:
    """OUT/png/{i:06d}.png for every sample not written yet (from the shards, or from
    the final .npz when the shards are gone)."""
    from PIL import Image

    missing = [i for i in range(plan.num) if not (out / PNG_DIR / f"{i:06d}.png").exists()]
    if not missing:
        return 0
    if (out / SHARDS_DIR).exists():
        source = lambda k: _load_shard(out / SHARDS_DIR / plan.shard_name(k), plan, k)[0]  # noqa: E731
    else:
        everything = _read_member(out / plan.final_name, "arr_0")
        source = lambda k: everything[slice(*plan.bounds(k))]  # noqa: E731
    want = set(missing)
    for k in range(plan.num_batches):
        lo, hi = plan.bounds(k)
        if want.isdisjoint(range(lo, hi)):
            continue
        images = source(k)
        for i in range(lo, hi):
            if i in want:
                paths.save_png(out / PNG_DIR / f"{i:06d}.png", Image.fromarray(images[i - lo]))
    return len(missing)
