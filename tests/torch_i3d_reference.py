"""An independent PyTorch I3D for parity tests, written from piergiaj/pytorch-i3d's
pytorch_i3d.py (its parameter names, so its state dict is the piergiaj layout) and the
FVD detector's input pipeline.

Channels-first NCDHW as torch. TF "SAME" padding is computed per call from the input
size, as piergiaj does: pad = max(k - s, 0) when s divides the size, else max(k - size % s, 0),
the smaller half in front; max pools pad with zeros (their inputs are post-ReLU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MIXED = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)


def same_pad(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    pads: list[int] = []  # F.pad order: last axis first
    for axis in [4, 3, 2]:
        size, k, s = x.shape[axis], kernel[axis - 2], stride[axis - 2]
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True, relu=True, bias=False):
        super().__init__()
        self.kernel: tuple[int, int, int] = (kernel[0], kernel[1], kernel[2])
        self.stride: tuple[int, int, int] = (stride[0], stride[1], stride[2])
        self.relu, self.use_bn = relu, bn
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=0.001, momentum=0.01) if bn else nn.Identity()

    def forward(self, x):
        x = self.bn(self.conv3d(same_pad(x, self.kernel, self.stride)))
        return F.relu(x) if self.relu else x


class SamePool(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel: tuple[int, int, int] = (kernel[0], kernel[1], kernel[2])
        self.stride: tuple[int, int, int] = (stride[0], stride[1], stride[2])

    def forward(self, x):
        return F.max_pool3d(same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Block(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a = Unit3D(cin, c[1])
        self.b1b = Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a = Unit3D(cin, c[3])
        self.b2b = Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a = SamePool((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class TorchI3D(nn.Module):
    """piergiaj's InceptionI3d (400 classes). forward(x in [-1, 1], NCDHW) -> logits
    (B, 400, T') after spatial squeeze, as piergiaj returns them; `pool_window` replaces
    the (2, 7, 7) average pool for small test inputs."""

    def __init__(self, pool_window=(2, 7, 7)):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = SamePool((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = SamePool((1, 3, 3), (1, 2, 2))
        blocks = {name: Block(cin, c) for name, cin, c in MIXED}
        self.Mixed_3b, self.Mixed_3c = blocks["Mixed_3b"], blocks["Mixed_3c"]
        self.MaxPool3d_4a_3x3 = SamePool((3, 3, 3), (2, 2, 2))
        self.Mixed_4b, self.Mixed_4c, self.Mixed_4d = blocks["Mixed_4b"], blocks["Mixed_4c"], blocks["Mixed_4d"]
        self.Mixed_4e, self.Mixed_4f = blocks["Mixed_4e"], blocks["Mixed_4f"]
        self.MaxPool3d_5a_2x2 = SamePool((2, 2, 2), (2, 2, 2))
        self.Mixed_5b, self.Mixed_5c = blocks["Mixed_5b"], blocks["Mixed_5c"]
        self.avg_pool = nn.AvgPool3d(tuple(pool_window), stride=(1, 1, 1))
        self.logits = Unit3D(1024, 400, bn=False, relu=False, bias=True)

    def forward(self, x):
        x = self.MaxPool3d_3a_3x3(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(x)))))
        x = self.MaxPool3d_4a_3x3(self.Mixed_3c(self.Mixed_3b(x)))
        x = self.MaxPool3d_5a_2x2(self.Mixed_4f(self.Mixed_4e(self.Mixed_4d(self.Mixed_4c(self.Mixed_4b(x))))))
        x = self.Mixed_5c(self.Mixed_5b(x))
        return self.logits(self.avg_pool(x)).squeeze(3).squeeze(3)


class Detector(nn.Module):
    """A StyleGAN-V-style detector module around TorchI3D (scriptable, so tests can write a
    TorchScript archive): forward(x, rescale, resize, return_features)."""

    def __init__(self, pool_window=(2, 7, 7)):
        super().__init__()
        self.i3d = TorchI3D(pool_window)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False):
        x = x.float()
        if rescale:
            x = x / 255 * 2 - 1
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        logits = self.i3d(x).mean(2)
        return logits if return_features else F.softmax(logits, dim=1)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-zero weights and BatchNorm statistics (He-normal convs, positive
    variances), deterministic for `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv3d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.BatchNorm3d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


@torch.no_grad()
def detector_features(model: TorchI3D, videos: np.ndarray, size: int = 224) -> np.ndarray:
    """StyleGAN-V's detector call with rescale=True, resize=True, return_features=True on
    uint8 NDHWC videos: x / 255 * 2 - 1, trilinear resize of (H, W) to `size` keeping the
    time size (align_corners=False), the logits averaged over time. (B, 400) float64."""
    x = torch.from_numpy(np.ascontiguousarray(videos)).permute(0, 4, 1, 2, 3).float()
    x = x / 255 * 2 - 1
    if size is not None and tuple(x.shape[3:]) != (size, size):
        x = F.interpolate(x, size=(x.shape[2], size, size), mode="trilinear", align_corners=False)
    return model(x).mean(2).double().numpy()


def to_hassony2(state: dict) -> dict:
    """The same weights under hassony2/kinetics_i3d_pytorch's names."""
    branch = {
        "b0": "branch_0", "b1a": "branch_1.0", "b1b": "branch_1.1", "b2a": "branch_2.0", "b2b": "branch_2.1", "b3b": "branch_3.1",
    }
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0].startswith("Mixed_"):
            parts = ["mixed_" + parts[0][len("Mixed_") :], branch[parts[1]], *parts[2:]]
        elif parts[0] == "logits":
            parts[0] = "conv3d_0c_1x1"
        else:
            parts[0] = parts[0].lower()
        out[".".join("batch3d" if p == "bn" else p for p in parts)] = v
    return out
