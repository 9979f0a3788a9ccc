"""Training Latte-T2V-skip: the two-stage recipe configs (configs/latte_t2v_skip.py), the
t2v update guard in stage 1 (gradient norm over the trainable parameters only, NaN or
above the threshold: skipped and counted), and a tiny Latte-T2V-skip trained jointly with a
small T5 on captioned moving digits through the trainer: stage 1 from a vanilla model
changes only the skip modules (no optimizer state for the rest), and a run stopped and
resumed equals the uninterrupted one."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, tiny_config

from skipdit_jax.errors import ConfigError
from skipdit_jax.training import config as train_config
from skipdit_jax.training import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_t2v_stage_configs_follow_the_official_recipe():
    from skipdit_jax.models.families import family_of

    for stage in ("stage1", "stage2"):
        c = _load_config("latte_t2v_skip.py", stage)
        mc = train_config.model_config(c)
        assert type(mc).family == "latte_t2v" and mc.long_skip and (mc.depth, mc.hidden_size, mc.num_heads) == (28, 1152, 16)
        assert (mc.input_size, mc.num_frames, mc.caption_channels, mc.text_len) == (64, 16, 4096, 120)
        assert (mc.dtype, mc.remat_policy, mc.skip_init) == ("bfloat16", "nothing_saveable", "torch_default")
        t, o = c.train, c.optimizer
        assert (t.global_batch_size, t.grad_accum_steps, t.grad_skip_threshold, t.label_dropout) == (32, 2, 0.02, 0.0)
        assert t.ema_decay == pytest.approx(0.99985) and not t.ema_warmup
        assert (o.lr, o.weight_decay, o.decay, o.warmup_steps, o.grad_clip) == (1e-4, 0.0, "constant", 0, 0.0)
        assert (c.data.image_size, c.data.num_frames, c.data.frame_interval, c.data.flip) == (512, 16, 4, False)
        assert c.seed == 3407 and c.data.video_resize == "center_crop_resize"
        assert c.data.images_per_video == mc.joint_images == 4  # use_image_num
    assert _load_config("latte_t2v_skip.py", "stage1").train.trainable == "skip_only"
    assert _load_config("latte_t2v_skip.py", "stage2").train.trainable == "all"
    assert _load_config("latte_t2v_skip.py", "stage2").train.init_use_ema
    # Stage 1 trains exactly the 14 fusions of the 28-pair model (abstract: nothing allocated).
    params = family_of(train_config.model_config(_load_config("latte_t2v_skip.py", "stage1"))).abstract_params()
    mask = optim.trainable_mask(params, "skip_only")
    trained = [p for p, m in jax.tree_util.tree_leaves_with_path(mask) if m]
    assert trained and all(jax.tree_util.keystr(p).startswith("['skip_fusions']") for p in trained)
    assert {a.shape[0] for a in jax.tree.leaves(params["skip_fusions"])} == {14}
    with pytest.raises(ValueError, match="stage1"):
        _load_config("latte_t2v_skip.py", "stage3")


def test_text_configs_are_validated():
    c = _load_config("text_moving_digits.py", None)
    mc = train_config.validate(c, 1)
    assert (type(mc).family, mc.text_len, mc.num_frames, mc.in_channels, mc.caption_channels) == ("latte_t2v_joint", 8, 8, 1, 64)
    for change, match in [
        (dict(flip=True), "contradict its caption"),
        (dict(name="mnist"), "text-conditioned"),
        (dict(images_per_video=2), "not supported"),
    ]:
        bad = _load_config("text_moving_digits.py", None)
        bad.unlock()
        bad.data.update(change)
        with pytest.raises(ConfigError, match=match):
            train_config.validate(bad, 1)
    latte = train_config.default_config()
    latte.model.family = "latte"
    latte.data.update(name="text_moving_digits", image_size=16, num_classes=0)
    with pytest.raises(ConfigError, match="needs a text model"):
        train_config.validate(latte, 1)


def test_stage1_guard_measures_trainable_gradients_only():
    """skip_only: the gradient norm is the skip modules' alone (the official norm over the
    parameters that have gradients), so a threshold just under the norm of all gradients
    lets the update through; a NaN batch's update is skipped and counted, with weights, EMA
    and Adam state untouched. (A norm above the threshold: tests/test_train_step.py.)"""
    from skipdit_jax.training.train_step import init_train_state, make_train_step

    cfg = tiny_config(in_channels=1, num_classes=4, depth=4)
    params = jax.tree.map(jnp.asarray, random_params(cfg))
    opt = train_config.ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, steps=10))
    tx = optim.make_optimizer(opt, params, "skip_only")
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32), "label": jnp.arange(4) % 4}
    state = init_train_state(params, tx)
    # The norm of all gradients of the same loss (every parameter trainable).
    plain = jax.jit(make_train_step(cfg, optim.make_optimizer(opt, params), ema_decay=0.9, label_dropout=0.0))
    _, m_all = plain(init_train_state(params, optim.make_optimizer(opt, params)), batch, jax.random.key(1))
    threshold = float(m_all["grad_norm"]) * 0.999
    guard = jax.jit(make_train_step(cfg, tx, ema_decay=0.9, label_dropout=0.0, trainable="skip_only", grad_skip_threshold=threshold))
    new, m = guard(state, batch, jax.random.key(1))
    assert float(m["loss"]) == pytest.approx(float(m_all["loss"]), rel=1e-6)
    assert 0 < float(m["grad_norm"]) < threshold and int(new.skipped_updates) == 0
    assert not np.array_equal(new.params["skip_fusions"]["linear"]["kernel"], params["skip_fusions"]["linear"]["kernel"])
    np.testing.assert_array_equal(new.params["final_layer"]["linear"]["kernel"], params["final_layer"]["linear"]["kernel"])
    nan_batch = {**batch, "image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
    after, m_nan = guard(new, nan_batch, jax.random.key(1))
    assert int(after.skipped_updates) == 1 and int(after.step) == 2 and not np.isfinite(float(m_nan["grad_norm"]))
    for a, b in zip(jax.tree.leaves((after.params, after.ema_params, after.opt_state)), jax.tree.leaves((new.params, new.ema_params, new.opt_state))):
        np.testing.assert_array_equal(a, b)


# ---- a tiny joint Latte-T2V-skip through the trainer -----------------------------------------------
TINY_CONFIG = '''
from skipdit_jax.training.config import default_config, finalize


def get_config(arg=None):
    c = default_config()
    c.model.update(family="latte_t2v_joint", depth=2, hidden_size=32, num_heads=2, patch_size=4, long_skip=arg != "vanilla")
    c.model.caption_channels = 16
    c.model.text_layers = 1
    c.model.text_heads = 2
    c.model.text_d_kv = 8
    c.model.text_d_ff = 32
    c.data.update(name="text_moving_digits", image_size=8, num_classes=0, flip=False, num_frames=2, text_len=8)
    c.train.update(steps=4, global_batch_size=4, grad_accum_steps=2, log_every=1, ema_decay=0.99985, label_dropout=0.5,
                   trainable="skip_only")
    c.checkpoint.update(every=2, keep=3, async_save=False)
    return finalize(c)
'''

# argv: config file, tmp dir. A vanilla (no skips) model with random non-zero weights is saved
# as the "pretrained" model; stage 1 starts from it (fresh skip modules) for 4 steps; then the
# step-4 checkpoint is removed and the run restarted, so it resumes at step 2. Prints JSON.
RUN_SCRIPT = """
import importlib.util, json, shutil, sys
import jax, numpy as np
from skipdit_jax.model_store import save_model
from skipdit_jax.models.families import family_of
from skipdit_jax.training import config as tc
from skipdit_jax.training.train import train_and_evaluate

config_file, tmp = sys.argv[1:]
spec = importlib.util.spec_from_file_location("tiny", config_file)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
vanilla_cfg = tc.model_config(module.get_config("vanilla"))
rng = np.random.default_rng(0)
# Random non-zero weights everywhere (from shapes: no initialiser to compile), so gradients
# reach the skip modules through every layer.
vanilla = jax.tree.map(lambda a: 0.2 * rng.standard_normal(a.shape).astype(np.float32), family_of(vanilla_cfg).abstract_params())
save_model(f"{tmp}/vanilla", vanilla_cfg, vanilla)
flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(tree)}
out = {}
for name in ("full", "resumed"):
    config = module.get_config()
    config.unlock()
    config.train.init_from = f"{tmp}/vanilla"
    r = train_and_evaluate(config, f"{tmp}/run", progress=False)
    out[name] = flat(r.state.params)
    if name == "full":
        out["opt_state_size"] = int(sum(np.size(a) for a in jax.tree.leaves(r.state.opt_state)))
        out["skip_size"] = int(sum(np.size(a) for a in jax.tree.leaves(r.state.params["model"]["skip_fusions"])))
        out["losses"] = [json.loads(l) for l in open(f"{tmp}/run/metrics.jsonl")]
        shutil.rmtree(f"{tmp}/run/checkpoints/4")
before = flat(vanilla)
report = {
    "unchanged": sorted(k for k, a in before.items() if np.array_equal(a, out["full"][k])),
    "frozen": sorted(before),
    "changed_skips": sorted(k for k, a in out["full"].items() if k not in before and "skip_fusions" in k),
    "fresh": sorted(k for k in out["full"] if k not in before),
    "resume_equal": all(np.array_equal(out["full"][k], out["resumed"][k]) for k in out["full"]),
    "losses": out["losses"], "resumed_losses": [json.loads(l) for l in open(f"{tmp}/run/metrics.jsonl")],
    "opt_state_size": out["opt_state_size"], "skip_size": out["skip_size"],
}
print("REPORT" + json.dumps(report))
"""


def test_tiny_joint_t2v_stage1_and_exact_resume(tmp_path):
    """4 steps (2 micro-batches each) of stage 1 of a 2-pair Latte-T2V-skip with a 1-layer T5,
    from a saved vanilla model: only the fresh skip modules change, Adam state exists for them
    alone; restarted from the step-2 checkpoint the run reaches the same weights bit for bit."""
    config = tmp_path / "tiny_t2v.py"
    config.write_text(TINY_CONFIG)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, str(config), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Latte-T2V-skip 2 pairs width 32, 2 frames + a 1-layer T5" in proc.stdout
    assert "resuming at step 2 of 4" in proc.stdout
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    # Everything the vanilla model had is bit-identical; the fresh skip modules trained.
    assert report["unchanged"] == report["frozen"] and any("text_encoder" in k for k in report["frozen"])
    assert report["fresh"] == report["changed_skips"] and report["fresh"]
    # Adam's mu and nu for the skip modules only (+ scalar counters).
    assert 2 * report["skip_size"] <= report["opt_state_size"] <= 2 * report["skip_size"] + 8
    losses = {r["step"]: r for r in report["losses"] if "loss" in r}
    resumed = {r["step"]: r for r in report["resumed_losses"] if "loss" in r}
    assert sorted(losses) == sorted(resumed) == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and np.isfinite(r["loss"]) and r["skipped_updates"] == 0 for r in losses.values())
    for s in (3, 4):
        assert resumed[s]["loss"] == losses[s]["loss"] and resumed[s]["grad_norm"] == losses[s]["grad_norm"]
    assert report["resume_equal"]
    model = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert (model["family"], model["text_layers"], model["caption_channels"], model["num_frames"]) == ("latte_t2v_joint", 1, 16, 2)
    shutil.rmtree(tmp_path / "jax_cache", ignore_errors=True)
