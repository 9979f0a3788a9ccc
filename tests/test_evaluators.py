"""In-loop evaluators (skipdit_jax/training/evaluators.py): config errors are one line
before anything compiles; `sample.every` is the old spelling of `evals.grid.every`; an
evaluation interrupted by SIGTERM or by a failure is redone exactly once on resume and a
completed one never; "classifier_fid" and "fid" (random-weight Inception, tiny reference)
against independent computations. Tiny models (8x8 MNIST, depth 2, width 16)."""

import json
import os
import signal

import numpy as np
import pytest

from skipdit_jax.errors import ConfigError


@pytest.fixture
def compilation_cache(tmp_path_factory):
    """A persistent XLA compilation cache: the resume test starts the trainer three times
    with one config, and only the first run needs to compile (the test's wall time, not its
    meaning). Restored afterwards."""
    import jax
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    values = (str(tmp_path_factory.mktemp("xla_cache")), 0.0, -1)
    for n, v in zip(names, values):
        jax.config.update(n, v)
    cc.reset_cache()
    yield
    for n, v in before.items():
        jax.config.update(n, v)
    cc.reset_cache()


def _config(steps=8, **evals):
    """A tiny MNIST Skip-DiT config with `evals` added (locked afterwards)."""
    from skipdit_jax.training import config as train_config

    c = train_config.default_config()
    c.model.update(depth=2, hidden_size=16, num_heads=2, patch_size=2)
    c.data.update(image_size=8)
    c.train.update(global_batch_size=8, steps=steps, log_every=1)
    c.checkpoint.update(async_save=False, every=100)  # only evaluation steps and the last are saved
    c.optimizer.update(warmup_steps=0, decay="constant")
    c.sample.update(sampler="ddim", num_steps=2, batch_size=8)
    for name, entry in evals.items():
        c.evals[name] = entry
    return train_config.finalize(c)


def _validate(config):
    from skipdit_jax.training import config as train_config

    return train_config.validate(config, 1)


def _build(config):
    from skipdit_jax.models.families import family_of
    from skipdit_jax.training import evaluators

    return evaluators.build_evaluators(config, family_of(_validate(config)))


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "evals,needle",
    [
        (dict(x=dict(type="inception", every=1)), "evals.x: unknown type 'inception'; known types: classifier_fid, fid, grid"),
        (dict(grid=dict(type="grid", every=1, num_sample=3)), "evals.grid (grid): unknown key num_sample; allowed: every, dir"),
        (dict(grid=dict(type="grid", every=-2)), "evals.grid.every must be an integer >= 0 (0 = off), got -2"),
        (dict(grid=dict(type="grid", every=1, num_steps=0)), "evals.grid (grid): num_steps must be >= 1"),
        (dict(fid=dict(type="fid", every=5)), "evals.fid (fid): ref (the reference batch"),
        (dict(fid=dict(type="fid", every=5, ref="/nonexistent/ref.npz")), "evals.fid (fid): reference /nonexistent/ref.npz not found"),
        (dict(fid=dict(type="fid", every=5, ref=__file__, metrics="fid,kid")), "evals.fid (fid): metrics: unknown metric(s) ['kid']"),
        (dict(fid=dict(type="fid", every=5, ref=__file__, cfg_channels=4)), "evals.fid (fid): cfg_channels must be an integer in 1..1"),
        (dict(c=dict(type="classifier_fid", every=5, num_samples=1)), "evals.c (classifier_fid): num_samples must be >= 2"),
        (dict(c=dict(type="classifier_fid", every=5, classifier="/nonexistent")), "is not a classifier directory"),
    ],
)
def test_config_errors_are_one_line(evals, needle):
    with pytest.raises(ConfigError) as e:
        _validate(_config(**evals))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_an_evaluator_that_is_off_is_not_checked_and_a_reference_may_be_remote(tmp_path, monkeypatch):
    """every=0: no reference needed. A gs:// reference is checked through epath."""
    fake_gcs = pytest.importorskip("fake_gcs")
    _build(_config(fid=dict(type="fid", every=0)))
    monkeypatch.chdir(tmp_path)
    with fake_gcs.installed(tmp_path / "gcs") as root:
        (root / "bucket").mkdir(parents=True)
        (root / "bucket" / "ref.npz").write_bytes(b"x")
        [ev] = [ev for ev in _build(_config(fid=dict(type="fid", every=5, ref="gs://bucket/ref.npz"))) if ev.name == "fid"]
        assert ev.every == 5 and ev.settings["sampler"] == "ddim"  # inherited from config.sample
        with pytest.raises(ConfigError, match="reference gs://bucket/missing.npz not found"):
            _build(_config(fid=dict(type="fid", every=5, ref="gs://bucket/missing.npz")))


def test_sample_every_is_the_old_spelling_of_evals_grid_every():
    """sample.every sets the grid's interval unless evals.grid.every is non-zero."""

    def grid_every(sample_every=None, **evals):
        config = _config(**evals)
        with config.unlocked():
            config.sample.every = sample_every
        return {ev.name: ev.every for ev in _build(config)}["grid"]

    assert grid_every() == 0
    assert grid_every(6) == 6
    assert grid_every(grid=dict(type="grid", every=5)) == 5
    assert grid_every(0, grid=dict(type="grid", every=5)) == 5  # the new spelling wins
    assert grid_every(7, grid=dict(type="grid", every=5)) == 5
    assert grid_every(7, grid=dict(type="grid", every=0)) == 7
    config = _config(grid=dict(type="fid", every=0))
    with config.unlocked():
        config.sample.every = 3
    with pytest.raises(ConfigError, match="sample.every is the old spelling of evals.grid.every, but evals.grid is not a 'grid'"):
        _build(config)


def _frechet_low_rank(f, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) for the n < d samples `f`,
    without a d x d square root: S1 = A A^T with A = (f - mean)^T / sqrt(n - 1), and the
    non-zero eigenvalues of S1 S2 are those of the n x n matrix A^T S2 A."""
    a = (f - f.mean(0)).T / np.sqrt(len(f) - 1)
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(a.T @ s2 @ a), 0, None)))
    return np.sum((f.mean(0) - mu2) ** 2) + np.sum(a * a) + np.trace(s2) - 2 * trace_sqrt


# ---- resumption -----------------------------------------------------------------------------------
def _rows(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_an_interrupted_evaluation_is_redone_once_and_a_completed_one_never(tmp_path, monkeypatch, compilation_cache):
    """Evaluators a (every 4) and b (every 6), 12 steps.
    Run 1: SIGTERM arrives during a's evaluation at step 8: it stops between batches, the
    run ends preempted at step 8 (checkpoint saved, no row for a@8).
    Run 2: resumes at 8, first redoes a@8, trains to 12, completes a@12, then b@12 fails.
    Run 3: resumes at 12 and redoes b@12 only (a@12 has its row).
    In the end every evaluation has exactly one row and every step one training row."""
    from skipdit_jax.training import evaluators
    from skipdit_jax.training.train import train_and_evaluate

    workdir = tmp_path / "run"
    config = _config(steps=12, a=dict(type="grid", every=4), b=dict(type="grid", every=6, dir="samples_b"))
    calls, plan = [], {}
    original = evaluators.GridEvaluator.run

    def spy(self, params, step, ctx):
        calls.append((self.name, step))
        action = plan.pop((self.name, step), None)
        if action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler only sets a flag
        elif action == "fail":
            raise RuntimeError("injected evaluation failure")
        return original(self, params, step, ctx)

    monkeypatch.setattr(evaluators.GridEvaluator, "run", spy)

    plan[("a", 8)] = "sigterm"
    result = train_and_evaluate(config, str(workdir), progress=False)
    assert result.preempted and result.final_step == 8
    assert calls == [("a", 4), ("b", 6), ("a", 8)]
    assert {"8", "4", "6"} <= set(os.listdir(workdir / "checkpoints"))

    calls.clear()
    plan[("b", 12)] = "fail"
    with pytest.raises(RuntimeError, match="injected"):
        train_and_evaluate(config, str(workdir), progress=False)
    assert calls == [("a", 8), ("a", 12), ("b", 12)]

    calls.clear()
    result = train_and_evaluate(config, str(workdir), progress=False)
    assert calls == [("b", 12)] and result.steps_run == 0 and not result.preempted

    rows = _rows(workdir)
    done = [(k.split("/")[0], r["step"]) for r in rows for k in r if k.endswith("/seconds")]
    assert done == [("a", 4), ("b", 6), ("a", 8), ("a", 12), ("b", 12)]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert sorted(os.listdir(workdir / "samples")) == ["step_0000004.png", "step_0000008.png", "step_0000012.png"]
    assert sorted(os.listdir(workdir / "samples_b")) == ["step_0000006.png", "step_0000012.png"]


# ---- classifier_fid -------------------------------------------------------------------------------
def test_classifier_fid_against_an_independent_computation_and_its_classifier_cache(tmp_path, monkeypatch):
    import jax

    from skipdit_jax import sharding
    from skipdit_jax.data import mnist_source
    from skipdit_jax.evaluation import mnist_classifier as clf
    from skipdit_jax.training import evaluators

    monkeypatch.setenv("SKIPDIT_CACHE", str(tmp_path / "cache"))
    entry = dict(type="classifier_fid", every=1, num_samples=12, batch_size=12, classifier_steps=3)
    [ev] = [e for e in _build(_config(c=entry)) if e.name == "c"]
    ctx = evaluators.EvalContext(workdir=tmp_path, mesh=sharding.make_mesh(-1, 1))
    ev.prepare(ctx)  # trains the classifier (3 steps) and caches it
    assert (ev.cache_path() / clf.META_FILE).exists()
    params = jax.tree.map(lambda p: p + 0.01, ev.family.init_params(0))
    metrics = ev.run(params, 1, ctx)

    # Independently: the same noise and labels through the sampler, features of the cached
    # classifier, a Fréchet distance from numpy's eigenvalues.
    from skipdit_jax.sampling import sample

    labels = np.arange(12) % 10
    noise = jax.random.normal(jax.random.key(0), (12, 8, 8, 1))
    x = np.clip(np.asarray(sample(ev.family.config, params, noise=noise, labels=labels, sampler="ddim", num_steps=2, cfg_scale=4.0, clip_denoised=True)), -1, 1)
    cparams, _ = clf.load_classifier(ev.cache_path())
    f1 = clf.features(cparams, x).astype(np.float64)
    f2 = clf.features(cparams, mnist_source(8, split="train", resize="pad").images).astype(np.float64)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)))
    expected = np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    np.testing.assert_allclose(metrics["fid"], expected, rtol=1e-3)
    assert metrics["class_accuracy"] == np.mean(clf.predict(cparams, x) == labels)

    # A second evaluator of the same setting loads the cached classifier.
    monkeypatch.setattr(clf, "fit_mnist_classifier", lambda *a, **k: pytest.fail("trained again"))
    [again] = [e for e in _build(_config(c=entry)) if e.name == "c"]
    again.prepare(ctx)
    assert again.run(params, 1, ctx) == metrics


# ---- fid ------------------------------------------------------------------------------------------
def test_fid_end_to_end_with_a_random_inception_and_a_tiny_reference(tmp_path, monkeypatch):
    """One "fid" evaluation of a tiny model: 3 samples in sharded batches of 2 (the last
    one half past num_samples), a random-weight Inception saved with save_inception, a
    reference .npz with precomputed mu/sigma and mu_s/sigma_s. The logged FID and sFID
    equal the Fréchet distances (numpy eigenvalues) of the features of the same samples,
    the Inception Score ADM's formula on their logits. (The trainer's side of running
    evaluators is the resume test's.)"""
    import jax

    from skipdit_jax import sharding
    from skipdit_jax.evaluation import inception
    from skipdit_jax.training import evaluators
    from skipdit_jax.training.metric_logging import MetricWriter

    monkeypatch.setenv("SKIPDIT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "inception.safetensors"
    inception.save_inception(inception.init_inception(jax.random.key(0)), weights)
    rng = np.random.default_rng(0)
    ref = {}
    for mu, sigma, d in (("mu", "sigma", 2048), ("mu_s", "sigma_s", 2023)):
        a = rng.standard_normal((d, 16)) * 0.1
        ref[mu], ref[sigma] = rng.standard_normal(d) * 0.1, a @ a.T
    np.savez(tmp_path / "ref.npz", **ref)
    entry = dict(type="fid", every=2, num_samples=3, batch_size=2, ref=str(tmp_path / "ref.npz"), inception=str(weights), metrics="fid,sfid,is", cfg_scale=1.0)
    [ev] = [e for e in _build(_config(fid=entry)) if e.name == "fid"]
    writer = MetricWriter(tmp_path, tensorboard=False)
    ctx = evaluators.EvalContext(workdir=tmp_path, mesh=sharding.make_mesh(-1, 1), writer=writer)
    ev.prepare(ctx)

    captured = {}
    original = evaluators.FIDEvaluator.features

    def keep(self, params, ctx):
        captured["features"] = out = original(self, params, ctx)
        return out

    monkeypatch.setattr(evaluators.FIDEvaluator, "features", keep)
    params = jax.tree.map(lambda p: p + 0.01, ev.family.init_params(0))
    evaluators.run_evaluations([ev], params, 2, ctx)
    [row] = _rows(tmp_path)
    assert row["step"] == 2 and sorted(row) == ["fid/fid", "fid/inception_score", "fid/seconds", "fid/sfid", "step"]

    feats = captured["features"]
    assert feats["pool"].shape == (3, 2048) and feats["spatial"].shape == (3, 2023) and feats["logits"].shape == (3, 1008)
    assert len({tuple(f[:8]) for f in feats["pool"]}) == 3  # three different samples
    for key, mu, sigma, name in (("pool", "mu", "sigma", "fid/fid"), ("spatial", "mu_s", "sigma_s", "fid/sfid")):
        f = feats[key].astype(np.float64)
        np.testing.assert_allclose(row[name], _frechet_low_rank(f, ref[mu], ref[sigma]), rtol=1e-3)
    p = np.exp(feats["logits"] - feats["logits"].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1)
    np.testing.assert_allclose(row["fid/inception_score"], np.exp(kl.mean()), rtol=1e-4)


def test_grid_of_a_video_model_is_an_animated_gif_of_per_frame_grids(tmp_path):
    """A video family's preview is one grid per frame, as a GIF with one frame per video frame."""
    from PIL import Image

    from skipdit_jax import sharding
    from skipdit_jax.training import config as train_config
    from skipdit_jax.training import evaluators

    c = train_config.default_config()
    c.model.update(family="latte", depth=4, hidden_size=16, num_heads=2, patch_size=2, long_skip=True, skip_init="xavier")
    c.data.update(name="moving_digits", image_size=8, num_frames=3)
    c.sample.update(sampler="ddim", num_steps=2, batch_size=8, num_per_class=1)
    c.evals.grid = dict(type="grid", every=1)
    config = train_config.finalize(c)
    (grid,) = _build(config)
    family = grid.family
    params = family.init_params(0)
    ctx = evaluators.EvalContext(workdir=tmp_path, mesh=sharding.make_mesh(-1, 1))
    grid.run(params, 5, ctx)
    path = tmp_path / "samples" / "step_0000005.gif"
    with Image.open(path) as gif:
        assert gif.n_frames == 3  # one grid per frame (random weights: no two frames alike)
        size = gif.size
    # 10 classes in one row of 8x8 frames with 2-pixel padding, upscaled 8x for viewing.
    assert size == ((10 * 10 + 2) * 8, (10 + 2) * 8)
