"""The FID Inception-v3 in Flax (NHWC): the network pytorch-fid runs, for FID, sFID,
Inception Score and precision/recall.

Network. Exactly `pytorch_fid.inception.fid_inception_v3()` wrapped in pytorch-fid's
`InceptionV3(resize_input=True, normalize_input=True)`: torchvision's Inception-v3 with
the FID patches (`FIDInceptionA`/`C`/`E_1` average-pool 3x3, stride 1, pad 1 without
counting the padding; `FIDInceptionE_2` max-pools in its pool branch), every conv a
`BasicConv2d` = conv (no bias) + BatchNorm(eps=0.001, running statistics: inference only)
+ ReLU, 1008 classes. Weights: pytorch-fid's port of TensorFlow's 2015-12-05 Inception
graph, `INCEPTION_WEIGHTS_URL` (`load_inception`, `skipdit convert-inception`).

Input pipeline (pytorch-fid's): uint8 (B, H, W, 3) of any H, W -> /255 -> bilinear resize
to 299x299 with half-pixel centres (torch `F.interpolate(..., align_corners=False)`), no
antialiasing, also when shrinking -> 2x - 1.

Outputs of `inception_features(params, images)` (float32):
* "pool"    (B, 2048): the global average pool (pytorch-fid's FID features);
* "logits"  (B, 1008): pool @ fc.weight.T WITHOUT the bias, as ADM's evaluator computes
  its Inception-Score softmax (`tf.matmul(pool3, W)`);
* "spatial" (B, 2023): ADM's sFID features, TF's `mixed_6/conv` = the output (after
  BN + ReLU) of Mixed_6d.branch1x1 (17x17x192), first 7 channels, flattened in NHWC
  order (17 * 17 * 7).

Against ADM's TensorFlow evaluator: the weights are those of the TF graph ADM runs, but
its input pipeline is the graph's own (TF1 `ResizeBilinear` without half-pixel centres,
then (x - 128) / 128), not pytorch-fid's above. FIDs from here are therefore pytorch-fid's
FIDs and differ slightly from the numbers ADM's TF evaluator prints for the same samples.
pytorch-fid's README reports 0.08 absolute (0.0009 relative) FID against the TF
implementation on one LSUN/ProGAN test; this project has not measured the gap on ImageNet,
so compare like with like.

Speed: every BatchNorm is folded into its conv once (`fold_batchnorm`), so the network runs
as conv + bias + ReLU. Convs and the fc product use `Precision.HIGHEST`: on GPU/TPU the
default would be a reduced-precision pass, which moves FID.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from skipdit_jax import paths
from skipdit_jax.errors import CheckpointError, UserError

INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
ENV_VAR = "SKIPDIT_INCEPTION"
INPUT_SIZE = 299
BN_EPS = 0.001
SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 channels of mixed_6/conv
_PRECISION = jax.lax.Precision.HIGHEST
_HINT = (
    f"get the FID Inception weights from {INCEPTION_WEIGHTS_URL} (or point ${ENV_VAR} at a local copy) and "
    "optionally convert them with `skipdit convert-inception SRC OUT.safetensors`"
)

# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) + BatchNorm(eps=0.001) + ReLU.

    Params: {"conv": {"kernel" HWIO}, "bn": {"scale", "bias", "mean", "var"}}; with
    `folded` the BatchNorm is already in the conv: {"conv": {"kernel", "bias"}}.
    `padding` is ((top, bottom), (left, right)), as torch's symmetric padding.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features, self.kernel_size, self.strides, self.padding, use_bias=self.folded, precision=_PRECISION, name="conv"
        )(x)
        if not self.folded:
            x = _FrozenBatchNorm(name="bn")(x)
        return nn.relu(x)


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with running statistics only (torch eval mode), stats kept as params."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


def _pad(kh: int, kw: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _avg_pool_same(x):  # FID patch: TF's average pool does not count the zero padding
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):  # torch MaxPool2d(3, stride=2): no padding
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/c/d)."""

    pool_features: int
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, folded=self.folded)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=_pad(5, 5), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision InceptionB (Mixed_6a), unpatched."""

    folded: bool = False

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, folded=self.folded)
        b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..e). Returns (output, branch1x1 output): Mixed_6d's
    branch1x1 is ADM's sFID layer."""

    channels_7x7: int
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, folded=self.folded)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=_pad(1, 7), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=_pad(7, 1), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=_pad(7, 1), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=_pad(1, 7), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=_pad(7, 1), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=_pad(1, 7), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """torchvision InceptionD (Mixed_7a), unpatched."""

    folded: bool = False

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, folded=self.folded)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=_pad(1, 7), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=_pad(7, 1), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b: average pool, padding not counted) or, with
    `max_pool`, FIDInceptionE_2 (Mixed_7c: max pool 3x3, stride 1, pad 1)."""

    max_pool: bool = False
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, folded=self.folded)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=_pad(1, 3), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=_pad(3, 1), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=_pad(1, 3), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=_pad(3, 1), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:  # max pooling pads with -inf, as torch's F.max_pool2d
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 on preprocessed NHWC float input (299x299, values in [-1, 1];
    see `preprocess`). Returns {"pool", "logits", "spatial"} as the module docstring says.
    With `folded` the params are those of `fold_batchnorm`."""

    folded: bool = False

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, folded=self.folded)
        x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=_pad(3, 3), name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_valid(x)
        x = InceptionA(32, self.folded, name="Mixed_5b")(x)
        x = InceptionA(64, self.folded, name="Mixed_5c")(x)
        x = InceptionA(64, self.folded, name="Mixed_5d")(x)
        x = InceptionB(self.folded, name="Mixed_6a")(x)
        x, _ = InceptionC(128, self.folded, name="Mixed_6b")(x)
        x, _ = InceptionC(160, self.folded, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, self.folded, name="Mixed_6d")(x)
        x, _ = InceptionC(192, self.folded, name="Mixed_6e")(x)
        x = InceptionD(self.folded, name="Mixed_7a")(x)
        x = InceptionE(False, self.folded, name="Mixed_7b")(x)
        x = InceptionE(True, self.folded, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = _LogitsNoBias(1008, name="fc")(pool)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        return {"pool": pool, "logits": logits, "spatial": spatial}


class _LogitsNoBias(nn.Module):
    """The fc layer (kernel (2048, 1008), bias (1008,)) applied WITHOUT its bias, as ADM's
    evaluator does; the bias is kept so the weights round-trip to pytorch-fid's layout."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.dot(x, kernel, precision=_PRECISION)


def init_inception(rng) -> dict:
    """Random FID-Inception params in the `inception_from_torch` layout (tests, benchmarks):
    He-normal conv kernels and random BatchNorm statistics (positive variances), so
    activations stay O(1) through the network. Deterministic for the key `rng`."""
    # numpy draws from a seed taken from the key: one jax.random call per distinct leaf
    # shape would compile ~100 small programs.
    seed = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
    gen = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(_param_shapes())
    out = []
    for path, leaf in leaves:
        name, shape = _key_name(path[-1]), leaf.shape
        if name == "kernel" and len(shape) == 4:
            value = gen.standard_normal(shape) * math.sqrt(2.0 / (shape[0] * shape[1] * shape[2]))
        elif name == "kernel":
            value = gen.standard_normal(shape) / math.sqrt(shape[0])
        elif name in ("scale", "var"):
            value = gen.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = 0.1 * gen.standard_normal(shape)
        out.append(value.astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.cache
def _param_shapes_cached():
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)["params"]


def _param_shapes():
    return jax.tree.map(lambda s: s, _param_shapes_cached())


def _key_name(k) -> str:
    return str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))


# --------------------------------------------------------------------------------------
# BatchNorm folding and the forward pass
# --------------------------------------------------------------------------------------


def fold_batchnorm(params) -> dict:
    """The same network as conv + bias + ReLU: each BasicConv2d's BatchNorm folded into its
    conv (kernel * s, bias - mean * s, s = scale / sqrt(var + eps)). Works on numpy or jax
    arrays (inside jit too)."""

    def fold(tree):
        if isinstance(tree, dict) and "conv" in tree and "bn" in tree:
            bn = tree["bn"]
            s = bn["scale"] / jnp.sqrt(bn["var"] + BN_EPS)
            return {"conv": {"kernel": tree["conv"]["kernel"] * s, "bias": bn["bias"] - bn["mean"] * s}}
        if isinstance(tree, dict):
            return {k: fold(v) for k, v in tree.items()}
        return tree

    return fold(params)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's bilinear `F.interpolate(size=out, align_corners=False)`
    along one axis: half-pixel centres, source index clamped at 0, no antialiasing."""
    # In float32, step by step, as torch computes it for float input (its rounding of the
    # source index shifts the weights by up to ~1e-4 when shrinking 512 -> 299).
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1))
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m.astype(np.float32)


def preprocess(images) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 (B, 299, 299, 3) in [-1, 1], as pytorch-fid: /255,
    bilinear resize (align_corners=False, no antialiasing), 2x - 1."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    h, w = x.shape[1], x.shape[2]
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        # Separable resize as two small matmuls; exact torch weights (see resize_matrix).
        x = jnp.einsum("oh,bhwc->bowc", resize_matrix(h, INPUT_SIZE), x, precision=_PRECISION)
        x = jnp.einsum("pw,bowc->bopc", resize_matrix(w, INPUT_SIZE), x, precision=_PRECISION)
    return 2.0 * x - 1.0


def _check_images(images) -> None:
    shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"Inception features need images of shape (N, H, W, 3), got shape {shape}")
    if dtype != np.uint8:
        raise UserError(f"Inception features need uint8 images (0-255), got {dtype}")


def _network(folded_params, x):
    return InceptionV3(folded=True).apply({"params": folded_params}, x)


def _forward(folded_params, images):
    return _network(folded_params, preprocess(images))


# inception_features resizes and runs the network as two programs, so every image size
# shares the network's compilation (per batch size); make_feature_fn fuses them.
_preprocess_jit = jax.jit(preprocess)
_network_jit = jax.jit(_network)
_fold_jit = jax.jit(fold_batchnorm)


def inception_features(params, images) -> dict[str, jax.Array]:
    """{"pool": (B, 2048), "logits": (B, 1008), "spatial": (B, 2023)} float32 features of
    uint8 images (B, H, W, 3) of any size (resized inside as pytorch-fid does). `params`
    as `inception_from_torch` / `load_inception` return. Meanings: module docstring."""
    _check_images(images)
    return _network_jit(_fold_jit(params), _preprocess_jit(images))


# --------------------------------------------------------------------------------------
# Sharded extraction
# --------------------------------------------------------------------------------------


def _batch_spec(mesh: Mesh) -> P:
    return P(tuple(mesh.axis_names))


def make_feature_fn(params, mesh: Mesh):
    """A function images -> features for images already on `mesh`: uint8 (B, H, W, 3)
    jax.Arrays batch-sharded over all mesh axes (B a multiple of the mesh size) ->
    {"pool", "logits", "spatial"} float32, batch-sharded the same way. The BatchNorms are
    folded once here and the folded params replicated over the mesh; one compiled program
    per image shape, shared by every call on the same mesh."""
    replicated = NamedSharding(mesh, P())

    # Every process holds the same host params; each puts them on its own devices only.
    def put(a):
        return jax.make_array_from_callback(np.shape(a), replicated, lambda index: np.asarray(a)[index])

    on_mesh = jax.tree.map(put, params)
    fold, forward = _jitted_on(mesh)
    folded = fold(on_mesh)

    def feature_fn(images):
        _check_images(images)
        if images.shape[0] % mesh.size:
            raise UserError(f"the batch ({images.shape[0]} images) must be a multiple of the {mesh.size} devices of the mesh")
        return forward(folded, images)

    return feature_fn


@functools.lru_cache(maxsize=8)
def _jitted_on(mesh: Mesh):
    """The jitted BatchNorm folding and forward for `mesh`, made once per mesh, so every
    `make_feature_fn` / `extract_features` call (the reference, then the samples; every
    in-loop evaluation) reuses their compiled programs."""
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, _batch_spec(mesh))
    fold = jax.jit(fold_batchnorm, out_shardings=replicated)
    forward = jax.jit(_forward, in_shardings=(replicated, batch), out_shardings=batch)
    return fold, forward


def default_mesh() -> Mesh:
    """A 1-D ('data',) mesh over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def extract_features(
    params, images, *, batch_size: int = 200, mesh: Mesh | None = None, progress: bool = False
) -> dict[str, np.ndarray]:
    """Features of every image of `images`, an array-like (N, H, W, 3) uint8 that every
    process can index (a numpy array, `np.load(..., mmap_mode="r")`, ...).

    The work is sharded over `mesh` (default: all devices of all processes): images go in
    global batches of `batch_size` rounded up to a multiple of the mesh size; each process
    reads only the rows its own devices hold, and the last batch is padded (with zeros) and
    trimmed. Every process gets all N rows back as float32 numpy arrays. One compiled
    program per (batch, H, W). `progress` shows a tqdm bar (images/s) on process 0.
    """
    _check_images(images)
    mesh = default_mesh() if mesh is None else mesh
    outputs = extract_sharded(make_feature_fn(params, mesh), images, batch_size=batch_size, mesh=mesh,
                              progress=progress, unit="img", desc="inception")
    if not outputs:
        widths = {"pool": 2048, "logits": 1008, "spatial": 17 * 17 * SPATIAL_CHANNELS}
        return {k: np.zeros((0, w), np.float32) for k, w in widths.items()}
    return outputs


def extract_sharded(feature_fn, data, *, batch_size: int, mesh: Mesh, progress: bool = False, unit: str = "item",
                    desc: str = "features") -> dict[str, np.ndarray]:
    """`feature_fn` (a jitted function of a uint8 batch sharded over `mesh` returning a dict of
    batch-sharded arrays) over every row of `data`, an array-like uint8 (N, ...) that every
    process can index. Global batches of `batch_size` rounded up to a multiple of the mesh
    size; each process reads only the rows its own devices hold; the last batch is padded
    with zeros and trimmed. Every process gets all N rows of every output, as numpy ({} when
    N == 0). One compiled program per batch shape. `progress`: a tqdm bar on process 0.
    Shared by the Inception (images) and the I3D (videos)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    n = int(data.shape[0])
    batch = max(1, math.ceil(min(batch_size, max(n, 1)) / mesh.size)) * mesh.size
    sharding = NamedSharding(mesh, _batch_spec(mesh))
    shape = (batch, *data.shape[1:])
    outputs: dict[str, list[np.ndarray]] = {}
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=n, unit=unit, desc=desc, smoothing=0.1)
    try:
        for start in range(0, n, batch):

            def rows(index, start=start):  # this process's slice of the global batch
                lo, hi, _ = index[0].indices(batch)
                lo_g, hi_g = start + lo, min(start + hi, n)
                out = np.zeros((hi - lo, *data.shape[1:]), np.uint8)
                if hi_g > lo_g:
                    out[: hi_g - lo_g] = np.asarray(data[lo_g:hi_g])
                return out

            feats = feature_fn(jax.make_array_from_callback(shape, sharding, rows))
            valid = min(batch, n - start)
            for key, value in gather_features(feats).items():
                outputs.setdefault(key, []).append(value[:valid])
            if bar is not None:
                bar.update(valid)
    finally:
        if bar is not None:
            bar.close()
    return {k: np.concatenate(v) for k, v in outputs.items()}


def gather_features(tree) -> dict[str, np.ndarray]:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(tree, tiled=True).items()}
    return {k: np.asarray(v) for k, v in tree.items()}


# --------------------------------------------------------------------------------------
# Weights: pytorch-fid layout <-> params
# --------------------------------------------------------------------------------------

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@functools.cache
def _torch_layout() -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
    """params path -> (torch key, torch shape) for every parameter."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(_param_shapes())[0]:
        names = tuple(_key_name(k) for k in path)
        shape = tuple(leaf.shape)
        if names[-2] == "bn":
            key = ".".join(names[:-1] + (_BN_NAMES[names[-1]],))
        elif names[-1] == "kernel":
            key = ".".join(names[:-1] + ("weight",))
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        else:
            key = ".".join(names)
        out[names] = (key, shape)
    return out


def _to_torch_value(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else (value.T if value.ndim == 2 else value)


def _from_torch_value(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else (value.T if value.ndim == 2 else value)


def _set(tree: dict, names: tuple[str, ...], value) -> None:
    for name in names[:-1]:
        tree = tree.setdefault(name, {})
    tree[names[-1]] = value


def _list(keys: Iterable[str], limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def inception_from_torch(state_dict) -> dict:
    """Params from a pytorch-fid Inception state dict (`pt_inception-2015-12-05-6726825d.pth`
    as `skipdit_jax.convert.load_torch_checkpoint` returns it, or the safetensors copy
    `save_inception` writes). Keys and shapes are checked strictly (`*.num_batches_tracked`
    is ignored): any missing or unexpected key or wrong shape is one CheckpointError line
    naming them. Conv weights OIHW -> HWIO, fc weight (1008, 2048) -> kernel (2048, 1008)."""
    layout = _torch_layout()
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    expected = {key for key, _ in layout.values()}
    missing, unexpected = expected - set(given), set(given) - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_list(unexpected)}")
        raise CheckpointError(f"not a pytorch-fid FID Inception state dict: {'; '.join(parts)}")
    params: dict = {}
    for names, (key, shape) in layout.items():
        value = np.asarray(given[key], np.float32)
        if value.shape != shape:
            raise CheckpointError(f"FID Inception weight {key} has shape {value.shape}, expected {shape}")
        _set(params, names, np.ascontiguousarray(_from_torch_value(value)))
    return params


def inception_to_torch(params) -> dict[str, np.ndarray]:
    """The pytorch-fid state dict (float32 numpy) of `params`; inverse of
    `inception_from_torch`."""
    out, layout = {}, _torch_layout()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(_key_name(k) for k in path)
        if names not in layout:
            raise UserError(f"not FID Inception params: unexpected entry {'/'.join(names)}")
        out[layout[names][0]] = np.ascontiguousarray(_to_torch_value(np.asarray(leaf, np.float32)))
    return out


def save_inception(params, out) -> None:
    """Write `params` as a safetensors file in pytorch-fid's key layout (atomically)."""
    from safetensors.numpy import save

    paths.atomic_write_bytes(out, save(inception_to_torch(params)))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _is_url(spec: str) -> bool:
    return spec.startswith(("https://", "http://"))


def _download(url: str) -> str:
    """The cached local copy of `url` under paths.cache_dir("inception"), downloaded once
    (atomically) and checked against the sha256 prefix in its name when it has one."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "inception.pth"
    target = paths.cache_dir("inception") / name
    if target.exists():
        return str(target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(
            f"could not download the FID Inception weights from {url} ({reason}); download the file elsewhere and set "
            f"${ENV_VAR} to its path (or convert it with `skipdit convert-inception SRC OUT.safetensors` and point "
            f"${ENV_VAR} at that)"
        ) from None
    found = re.search(r"-([0-9a-f]{6,64})\.[A-Za-z]+$", name)
    if found and not hashlib.sha256(data).hexdigest().startswith(found.group(1)):
        raise CheckpointError(f"the file downloaded from {url} does not match the sha256 prefix {found.group(1)} in its name")
    paths.atomic_write_bytes(target, data)
    return str(target)


def load_inception(spec: str | None = None) -> dict:
    """FID Inception params from `spec`: a pytorch-fid `.pth`/`.pt` (loaded safely, no code
    runs), a `.safetensors` in the pytorch-fid layout (`skipdit convert-inception` writes
    one), an https URL (downloaded once into paths.cache_dir("inception"), checked against
    the sha256 prefix in the file name) or an `hf://` / `gs://` path. None: $SKIPDIT_INCEPTION,
    else INCEPTION_WEIGHTS_URL. Any failure is one CheckpointError line saying where to get
    the file and how to convert it."""
    from skipdit_jax.convert.torch_io import load_torch_checkpoint

    spec = spec or os.environ.get(ENV_VAR) or INCEPTION_WEIGHTS_URL
    spec = str(spec)
    local = _download(spec) if _is_url(spec) else spec
    try:
        state = load_torch_checkpoint(local)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_HINT}") from None
    return inception_from_torch(state)


__all__ = [
    "INCEPTION_WEIGHTS_URL",
    "InceptionV3",
    "init_inception",
    "fold_batchnorm",
    "preprocess",
    "inception_from_torch",
    "inception_to_torch",
    "load_inception",
    "save_inception",
    "inception_features",
    "make_feature_fn",
    "extract_features",
    "default_mesh",
]
