"""ADM-semantics FID / sFID / Inception Score / precision-recall (inception_metrics) and
`skipdit evaluate`: closed forms, hand-worked cases, ADM's own formulas as references,
the file readers, the reference-feature cache and one-line errors."""

import json
import re
import zipfile

import numpy as np
import pytest
from scipy import linalg

from skipdit_jax import cli
from skipdit_jax.errors import UserError
from skipdit_jax.evaluation import inception_metrics as im


# ---- Fréchet distance ---------------------------------------------------------------------


def adm_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's FIDStatistics.frechet_distance (scipy sqrtm, eps fallback), the reference."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_feature_stats_is_np_cov_in_float64():
    f = np.random.default_rng(0).standard_normal((37, 6)).astype(np.float32) * 3 + 1
    s = im.feature_stats(f, chunk=5)  # several chunks, a short last one
    assert s.mu.dtype == s.sigma.dtype == np.float64
    np.testing.assert_allclose(s.mu, f.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=0, atol=1e-12)
    with pytest.raises(UserError, match="at least 2"):
        im.feature_stats(f[:1])


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    a = im.feature_stats(rng.standard_normal((50, 4)))
    assert abs(im.frechet_distance(a, a)) < 1e-10
    # 1-D Gaussians N(m, s^2): (m1 - m2)^2 + (s1 - s2)^2.
    one = lambda m, s: im.FeatureStats(np.array([m]), np.array([[s * s]]))  # noqa: E731
    assert im.frechet_distance(one(1.0, 2.0), one(-2.0, 0.5)) == pytest.approx(9 + 1.5**2, rel=1e-12)
    # Diagonal covariances: |m1 - m2|^2 + sum(v1 + v2 - 2 sqrt(v1 v2)).
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = np.sum((m1 - m2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = im.frechet_distance(im.FeatureStats(m1, np.diag(v1)), im.FeatureStats(m2, np.diag(v2)))
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("n", [200, 8])  # full-rank and singular (fewer samples than dims) covariances
def test_frechet_distance_agrees_with_adm_scipy_formula(n):
    rng = np.random.default_rng(n)
    d = 16
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    y = rng.standard_normal((n + 3, d)) @ rng.standard_normal((d, d)) + 0.5
    a, b = im.feature_stats(x), im.feature_stats(y)
    want = adm_frechet(a.mu, a.sigma, b.mu, b.sigma)
    assert im.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert im.frechet_distance_of_features(x, b) == pytest.approx(want, rel=1e-6)  # n x n path when n <= d
    with pytest.raises(UserError, match="mismatched feature dimensions"):
        im.frechet_distance(a, im.feature_stats(y[:, :3]))


# ---- Inception Score --------------------------------------------------------------------------


def adm_inception_score(preds, split_size):
    """ADM's compute_inception_score loop on probabilities (the reference)."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_hand_cases():
    rng = np.random.default_rng(2)
    row = rng.standard_normal(10).astype(np.float32)
    assert im.inception_score(np.tile(row, (6, 1))) == pytest.approx(1.0, abs=1e-6)  # p(y|x) = p(y): KL 0
    # N rows, each (numerically exactly) one-hot on its own class: KL = log N per row -> IS = N.
    onehot = 1000.0 * np.eye(4, 10, dtype=np.float32)
    assert im.inception_score(onehot) == pytest.approx(4.0, rel=1e-6)
    assert im.inception_score(50.0 * np.eye(4, 10, dtype=np.float32)) == pytest.approx(4.0, rel=1e-6)
    # Two classes: rows p = (3/4, 1/4) and (1/4, 3/4), marginal (1/2, 1/2); each row's KL is
    # 3/4 log(3/2) + 1/4 log(1/2), so IS = 1.5^0.75 * 0.5^0.25.
    logits = np.log(np.array([[0.75, 0.25], [0.25, 0.75]], np.float32))
    assert im.inception_score(logits) == pytest.approx(1.5**0.75 * 0.5**0.25, rel=1e-6)
    # Splits: [two identical rows] -> 1, [two distinct one-hots] -> 2; mean 1.5. With a fifth
    # row the last split holds one row (IS 1): (1 + 2 + 1) / 3.
    rows = np.stack([onehot[0], onehot[0], onehot[1], onehot[2], onehot[3]])
    assert im.inception_score(rows[:4], split_size=2) == pytest.approx(1.5, abs=1e-6)
    assert im.inception_score(rows, split_size=2) == pytest.approx(4 / 3, abs=1e-6)


def test_inception_score_matches_adm_on_random_logits():
    logits = (np.random.default_rng(3).standard_normal((23, 30)) * 3).astype(np.float32)
    e = np.exp(logits.astype(np.float64))
    preds = (e / e.sum(1, keepdims=True)).astype(np.float32)  # float32 softmax, as ADM's TF graph
    for split in (5000, 7):
        assert im.inception_score(logits, split_size=split) == pytest.approx(adm_inception_score(preds, split), rel=1e-5)
    with pytest.raises(UserError):
        im.inception_score(np.zeros((0, 5), np.float32))


# ---- precision and recall ---------------------------------------------------------------------


def brute_force_pr(ref, smp, k=3):
    """Float64 reference: full distance matrices, np.partition radii (self included)."""
    sq = lambda a, b: ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)  # noqa: E731
    r_ref = np.partition(sq(ref, ref), k, axis=1)[:, k]
    r_smp = np.partition(sq(smp, smp), k, axis=1)[:, k]
    d = sq(ref, smp)
    return float(np.mean((d <= r_ref[:, None]).any(0))), float(np.mean((d <= r_smp[None, :]).any(1))), r_ref


def test_precision_recall_hand_1d_k1():
    # k = 1: a radius is the squared distance to the nearest other point.
    # Reference 0, 1, 3 -> radii 1, 1, 4. Samples 0.5, 2.5, 10, 11 -> radii 4, 4, 1, 1.
    # Precision: 0.5 is 0.25 from 0 (<= 1), 2.5 is 0.25 from 3 (<= 4); 10 and 11 are >= 49
    # from every reference point: 2/4. Recall: 0 and 1 are 0.25 from 0.5 (radius 4), 3 is
    # 0.25 from 2.5 (radius 4): 3/3.
    ref = np.array([[0.0], [1.0], [3.0]], np.float32)
    smp = np.array([[0.5], [2.5], [10.0], [11.0]], np.float32)
    np.testing.assert_array_equal(im.manifold_radii(ref, k=1), [1, 1, 4])
    for dtype in ("float16", "float32"):  # every value here is exact in float16
        assert im.precision_recall(ref, smp, k=1, distance_dtype=dtype) == (0.5, 1.0)


def test_precision_recall_hand_2d_k3_with_ties_and_batches():
    # Reference: the unit square's corners, (5,5) and (-30,0). k = 3 counts the point itself,
    # so a radius is the 3rd-nearest other point's squared distance:
    #   corners: {1, 1, 2} -> 2;  (5,5): {32, 41, 41} -> 41;  (-30,0): {900, 901, 961} -> 961.
    # Samples a(.5,.5) b(2,1) c(2,2) d(3,3) e(9,0) f(10,10); their squared distances give
    # radii a 12.5, b 5, c 4.5, d 12.5, e 53, f 128.
    # Precision: a is 0.5 from a corner, b 1 from (1,1), c exactly 2 from (1,1) (<= 2: in),
    # d 8 from (5,5) (<= 41), e exactly 41 from (5,5) (in); f is 50 from (5,5), 162 from
    # (1,1), 1700 from (-30,0): out -> 5/6.
    # Recall: the corners are 0.5 from a (radius 12.5), (5,5) is 8 from d (radius 12.5);
    # (-30,0) is >= 930.5 from every sample, whose radii are <= 128: out -> 5/6.
    ref = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [5, 5], [-30, 0]], np.float32)
    smp = np.array([[0.5, 0.5], [2, 1], [2, 2], [3, 3], [9, 0], [10, 10]], np.float32)
    np.testing.assert_array_equal(im.manifold_radii(ref), [2, 2, 2, 2, 41, 961])
    np.testing.assert_array_equal(im.manifold_radii(smp), [12.5, 5, 4.5, 12.5, 53, 128])
    for dtype, rows, cols in (("float32", 10000, 10000), ("float16", 10000, 10000), ("float16", 1, 1), ("float16", 4, 5)):
        got = im.precision_recall(ref, smp, row_batch_size=rows, col_batch_size=cols, distance_dtype=dtype)
        assert got == (5 / 6, 5 / 6), (dtype, rows, cols)


def test_precision_recall_batching_independent_and_matches_brute_force():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((13, 5)).astype(np.float32)
    smp = (rng.standard_normal((11, 5)) * 1.3 + 0.4).astype(np.float32)
    p, r, radii = brute_force_pr(ref, smp)
    assert 0 < p < 1 and 0 < r < 1  # a case where both can be wrong
    np.testing.assert_allclose(im.manifold_radii(ref, distance_dtype="float32"), radii, rtol=1e-5)
    for rows, cols in ((10000, 10000), (1, 1), (5, 2)):
        assert im.precision_recall(ref, smp, row_batch_size=rows, col_batch_size=cols, distance_dtype="float32") == (p, r)
        np.testing.assert_array_equal(
            im.manifold_radii(ref, row_batch_size=rows, col_batch_size=cols), im.manifold_radii(ref)
        )


def test_float16_distances_and_their_float32_fallback():
    rng = np.random.default_rng(5)
    f = rng.uniform(0, 2, (9, 6)).astype(np.float32)
    r16, r32 = im.manifold_radii(f), im.manifold_radii(f, distance_dtype="float32")
    np.testing.assert_allclose(r16, r32, rtol=1e-2, atol=1e-2)  # float16 rounding, not garbage
    assert not np.array_equal(r16, r32)  # ... but really computed in float16
    big = f * 300  # squared norms ~1e5 overflow float16: the whole block falls back to float32
    np.testing.assert_array_equal(im.manifold_radii(big), im.manifold_radii(big, distance_dtype="float32"))
    with pytest.raises(UserError, match="float16"):
        im.manifold_radii(f, distance_dtype="bfloat16")


def test_precision_recall_bad_inputs():
    f = np.zeros((3, 4), np.float32)
    with pytest.raises(UserError, match="k=3 need more than 3"):
        im.manifold_radii(f)
    with pytest.raises(UserError, match="differ in dimension"):
        im.precision_recall(np.zeros((5, 4), np.float32), np.zeros((5, 3), np.float32))
    with pytest.raises(UserError, match="non-finite"):
        im.manifold_radii(np.full((5, 4), np.nan, np.float32))


# ---- files --------------------------------------------------------------------------------


def images(n, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_read_image_npz_memmaps_stored_arrays_and_reads_compressed_ones(tmp_path):
    x, y = images(5), np.arange(5)
    np.savez(tmp_path / "s.npz", x, y)
    got, labels = im.read_image_npz(tmp_path / "s.npz")
    assert isinstance(got, np.memmap) and not got.flags.writeable  # no copy of 50K images
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels, y)
    # A zip64 entry with a version-2.0 .npy header (what large streamed sample files hold).
    with zipfile.ZipFile(tmp_path / "z.npz", "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(zipfile.ZipInfo("arr_0.npy"), "w", force_zip64=True) as out:
            np.lib.format.write_array(out, x, version=(2, 0))
    got, _ = im.read_image_npz(tmp_path / "z.npz")
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, x)
    np.savez_compressed(tmp_path / "c.npz", arr_0=x)
    got, labels = im.read_image_npz(tmp_path / "c.npz")
    np.testing.assert_array_equal(got, x)
    assert labels is None


def test_read_image_npz_bad_inputs(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "nokey.npz", images=images(2))
    np.savez(tmp_path / "float.npz", images(2).astype(np.float32))
    np.savez(tmp_path / "gray.npz", images(2)[..., :1])
    np.savez(tmp_path / "flat.npz", np.zeros((4, 3), np.uint8))
    np.savez(tmp_path / "objects.npz", np.array([{"a": 1}, None], dtype=object))
    cases = {
        "missing.npz": "does not exist",
        "text.npz": "not a readable .npz",
        "nokey.npz": "has no arr_0",
        "float.npz": "must be uint8",
        "gray.npz": r"\(N, H, W, 3\) RGB",
        "flat.npz": r"\(N, H, W, 3\) RGB",
        "objects.npz": "Python objects",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as e:
            im.read_image_npz(tmp_path / name)
        assert "\n" not in str(e.value)


def _adm_reference(path, x=None, dim=2048, sdim=2023, seed=0):
    rng = np.random.default_rng(seed)
    arrays = dict(mu=rng.standard_normal(dim), sigma=np.eye(dim), mu_s=rng.standard_normal(sdim), sigma_s=np.eye(sdim))
    if x is not None:
        arrays["arr_0"] = x
    np.savez(path, **arrays)
    return arrays


def test_load_reference_kinds(tmp_path):
    from PIL import Image

    arrays = _adm_reference(tmp_path / "adm.npz", images(4), dim=6, sdim=5)
    ref = im.load_reference(tmp_path / "adm.npz")
    assert ref.num_images == 4 and ref.kind == "npz"
    np.testing.assert_array_equal(ref.stats.mu, arrays["mu"])
    np.testing.assert_array_equal(ref.spatial_stats.sigma, arrays["sigma_s"])
    _adm_reference(tmp_path / "stats.npz", None, dim=6, sdim=5)
    assert im.load_reference(tmp_path / "stats.npz").images is None
    np.savez(tmp_path / "plain.npz", images(3))
    plain = im.load_reference(tmp_path / "plain.npz")
    assert plain.stats is None and plain.num_images == 3
    folder = tmp_path / "folder"
    folder.mkdir()
    x = images(3, 6, 5)
    for i, a in enumerate(x):
        Image.fromarray(a).save(folder / f"{i}.png")
    Image.fromarray(x[0][..., 0]).save(folder / "gray.png")  # grayscale is read as RGB
    ref = im.load_reference(folder)
    assert ref.images.shape == (4, 6, 5, 3)
    np.testing.assert_array_equal(ref.images[:3], x)
    np.testing.assert_array_equal(ref.images[3], np.repeat(x[0][..., :1], 3, axis=-1))
    Image.fromarray(images(1, 7, 5)[0]).save(folder / "odd.png")
    with pytest.raises(UserError, match="not all one size"):
        im.load_reference(folder)
    np.savez(tmp_path / "empty.npz", labels=np.arange(3))
    with pytest.raises(UserError, match="neither arr_0 .* nor mu/sigma"):
        im.load_reference(tmp_path / "empty.npz")


def test_precomputed_reference_statistics_win_over_its_images(tmp_path):
    # ADM's read_statistics: an npz with mu uses mu/sigma (mu_s/sigma_s), not its images.
    arrays = _adm_reference(tmp_path / "adm.npz", images(4), dim=6, sdim=5)
    ref = im.load_reference(tmp_path / "adm.npz")
    rng = np.random.default_rng(6)
    feats = {"pool": rng.standard_normal((9, 6)), "spatial": rng.standard_normal((9, 5)), "logits": rng.standard_normal((9, 7))}
    other = {"pool": rng.standard_normal((4, 6)), "spatial": rng.standard_normal((4, 5))}  # the images' features
    got = im.compute_metrics(feats, ref, other, ("fid", "sfid", "is"))
    s = im.feature_stats(feats["pool"])
    assert got["fid"] == pytest.approx(adm_frechet(s.mu, s.sigma, arrays["mu"], arrays["sigma"]), rel=1e-8)
    s = im.feature_stats(feats["spatial"])
    assert got["sfid"] == pytest.approx(adm_frechet(s.mu, s.sigma, arrays["mu_s"], arrays["sigma_s"]), rel=1e-8)
    assert got["inception_score"] == im.inception_score(feats["logits"])
    plain = im.Reference("x", "npz", images(4), None, None, {})
    got = im.compute_metrics(feats, plain, other, ("fid",))
    assert got["fid"] == pytest.approx(im.frechet_distance(im.feature_stats(feats["pool"]), im.feature_stats(other["pool"])))


def test_reference_features_cache(tmp_path, monkeypatch):
    from skipdit_jax.evaluation import inception

    monkeypatch.setenv("SKIPDIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_extract(params, imgs, **kw):
        calls.append(len(imgs))
        x = np.asarray(imgs, np.float32).reshape(len(imgs), -1)
        n = len(imgs)
        return {"pool": np.resize(x, (n, 2048)), "spatial": np.resize(x, (n, 2023)), "logits": np.zeros((n, 1008), np.float32)}

    monkeypatch.setattr(inception, "extract_features", fake_extract)
    np.savez(tmp_path / "ref.npz", images(5))
    ref = im.load_reference(tmp_path / "ref.npz")
    params = {"w": np.ones((2, 2), np.float32)}
    first, cached = im.reference_features(ref, params)
    assert not cached and calls == [5]
    [file] = list((tmp_path / "cache" / "inception_features").iterdir())
    again, cached = im.reference_features(ref, params)
    assert cached and calls == [5]
    np.testing.assert_array_equal(again["pool"], first["pool"])
    # Other weights: another key.
    im.reference_features(ref, {"w": np.zeros((2, 2), np.float32)})
    assert calls == [5, 5]
    # A corrupt cache file is recomputed, then rewritten.
    file.write_bytes(file.read_bytes()[:100])
    _, cached = im.reference_features(ref, params)
    assert not cached and calls == [5, 5, 5]
    assert im.reference_features(ref, params)[1]
    # A changed reference file (size / mtime) is another key.
    np.savez(tmp_path / "ref.npz", images(6, seed=1))
    ref = im.load_reference(tmp_path / "ref.npz")
    _, cached = im.reference_features(ref, params)
    assert not cached and calls == [5, 5, 5, 6]


# ---- the command --------------------------------------------------------------------------


def run_cli(*args):
    try:
        return cli.main(["skipdit", "evaluate", *map(str, args)])
    except SystemExit as e:
        return e.code


def test_evaluate_command_bad_inputs(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", images(6))
    np.savez(tmp_path / "three.npz", images(3))
    np.savez(tmp_path / "one.npz", images(1))
    np.savez(tmp_path / "float.npz", images(6).astype(np.float32))
    np.savez(tmp_path / "gray.npz", images(6)[..., :2])
    np.savez(tmp_path / "ref.npz", images(6))
    np.savez(tmp_path / "nothing.npz", labels=np.arange(2))
    _adm_reference(tmp_path / "stats.npz")
    _adm_reference(tmp_path / "stats10.npz", dim=10, sdim=2023)
    out = tmp_path / "out.json"
    out.write_text("keep me")
    s, ref = tmp_path / "s.npz", tmp_path / "ref.npz"
    cases = [
        ((tmp_path / "missing.npz", "--ref", ref), "does not exist"),
        ((s, "--ref", tmp_path / "missing.npz"), "reference .* does not exist"),
        ((s, "--ref", tmp_path / "nothing.npz"), "neither arr_0"),
        ((tmp_path / "float.npz", "--ref", ref), "must be uint8"),
        ((tmp_path / "gray.npz", "--ref", ref), "RGB"),
        ((tmp_path / "three.npz", "--ref", ref), "k=3 need more than 3 samples"),
        ((s, "--ref", tmp_path / "three.npz"), "k=3 need more than 3 reference"),
        ((tmp_path / "one.npz", "--ref", ref, "--metrics", "fid"), "at least 2 samples"),
        ((s, "--ref", tmp_path / "stats.npz"), "precision/recall need reference images"),
        ((s, "--ref", tmp_path / "stats10.npz", "--metrics", "fid"), "mismatched feature dimensions"),
        ((s, "--ref", ref, "--metrics", "fid,kid"), "unknown metric"),
        ((s,), "--ref is required"),
        ((s, "--ref", ref, "--batch_size", 0), "batch_size"),
    ]
    for args, message in cases:
        assert run_cli(*args, "--out", out) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), (args, err)
    assert out.read_text() == "keep me"


def test_evaluate_command_end_to_end(tmp_path, monkeypatch, capsys):
    """One run on tiny images with a random-weight Inception file: samples are the
    reference's images in another order, so FID and sFID are ~0, precision = recall = 1."""
    import jax

    from skipdit_jax.evaluation import inception

    monkeypatch.setenv("SKIPDIT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "inception.safetensors"
    inception.save_inception(inception.init_inception(jax.random.key(0)), weights)
    x = images(5, 16, 16, seed=7)
    np.savez(tmp_path / "ref.npz", x)
    np.savez(tmp_path / "samples.npz", x[::-1], np.arange(5))
    args = ("--ref", tmp_path / "ref.npz", "--inception", weights, "--batch_size", 5, "--noprogress")
    assert run_cli(tmp_path / "samples.npz", *args) == 0
    stdout = capsys.readouterr().out
    assert "FID" in stdout and "Precision" in stdout and "samples.metrics.json" in stdout
    report = json.loads((tmp_path / "samples.metrics.json").read_text())
    [cache] = list((tmp_path / "cache" / "inception_features").iterdir())
    with np.load(cache) as z:
        trace = np.trace(im.feature_stats(z["pool"]).sigma)
        assert z["pool"].shape == (5, 2048) and z["spatial"].shape == (5, 2023)
    assert trace > 0
    assert abs(report["fid"]) < 1e-5 * trace and abs(report["sfid"]) < 1e-3
    assert report["precision"] == report["recall"] == 1.0
    assert np.isfinite(report["inception_score"]) and report["inception_score"] >= 1.0 - 1e-6
    assert report["num_samples"] == report["num_reference"] == 5
    assert report["inception"]["weights"] == str(weights) and len(report["inception"]["fingerprint"]) == 16
    assert report["settings"]["k"] == 3 and report["settings"]["distance_dtype"] == "float16"
    assert report["reference_statistics"].startswith("computed")
