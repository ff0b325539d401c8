"""InfoPro's auxiliary networks: the decoder that rebuilds the input image from a module's
output (`Decoder`), the ``<n>c<m>f`` classifier head (`make_classifier`), the supervised
contrastive loss (`supcon_loss`), and one module's head combining them (`InfoProHead`). The rule
that weights and builds them is `localearn_plugins.infopro`.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from localearn.interfaces import AuxHead, DataInfo, Shape, cross_entropy, hard_labels

LossMode = Literal["contrast", "ce"]
DecoderKind = Literal["auto", "upsample", "progressive"]


def supcon_loss(features: Tensor, targets: Tensor, temperature: float = 0.07) -> Tensor:
    """Single-view supervised contrastive loss (Khosla et al. 2020) as InfoPro uses it: for
    anchor i with positives P(i) (the other samples of its class) and A(i) (every other one),
    ``l_i = -1/|P(i)| sum_p log(exp(z_i.z_p/t) / sum_a exp(z_i.z_a/t))`` on L2-normalised
    features, averaged over all N anchors (one without positives counts as 0)."""
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    with torch.autocast(z.device.type, enabled=False):  # similarities / 0.07 in fp32
        logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (targets.view(-1, 1) == targets.view(1, -1)) & ~eye
    count = positive.sum(1).clamp(min=1)
    mean_log_pos = log_prob.masked_fill(~positive, 0.0).sum(1) / count
    return -mean_log_pos.mean()


class Decoder(nn.Module):
    """Rebuilds the image from a feature map; ``forward`` gives logits at the requested size.

    ``upsample`` (InfoPro on CIFAR/STL-10): bilinear upsampling to the image size, conv3x3 to
    12*widen channels, BN, ReLU, conv3x3 to the image's channels. ``progressive`` (InfoPro's
    ImageNet decoder, generalised; 512-128-32-12-3 for 512x28x28 features): 1x1 conv to
    min(C, 128*widen), then x2 upsampling and a conv3x3 quartering the width (at least
    12*widen) up to the image size, conv3x3 to the image's channels. ``auto``: ``upsample``
    for C <= 64 on images up to 96 pixels, else ``progressive``. The sigmoid is in the loss.
    """

    def __init__(self, shape: Shape, image_shape: tuple[int, int, int], widen: float = 1.0,
                 kind: DecoderKind = "auto") -> None:
        super().__init__()
        c, h, _ = shape
        out = image_shape[0]
        small = _scaled(12, widen)
        if kind == "auto":
            kind = "upsample" if c <= 64 and max(image_shape[1:]) <= 96 else "progressive"
        self.kind = kind
        if kind == "upsample":
            self.pre: nn.Module = nn.Identity()
            self.steps = nn.ModuleList()
            self.out = nn.Sequential(*_conv_bn_relu(c, small, 3),
                                     nn.Conv2d(small, out, 3, padding=1))
            return
        width = min(c, _scaled(128, widen))
        self.pre = nn.Sequential(*_conv_bn_relu(c, width, 1))
        ups = max(1, math.ceil(math.log2(max(1.0, image_shape[1] / h))))
        steps: list[nn.Module] = []
        for _ in range(ups - 1):
            nxt = max(small, width // 4)
            steps.append(nn.Sequential(*_conv_bn_relu(width, nxt, 3)))
            width = nxt
        self.steps = nn.ModuleList(steps)
        self.out = nn.Conv2d(width, out, 3, padding=1)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.pre(features)
        for step in self.steps:  # progressive only: x2 then conv, the last x2 goes to ``size``
            x = step(resize(x, (2 * x.shape[-2], 2 * x.shape[-1])))
        x = resize(x, size)
        if x.device.type == "cpu":  # oneDNN runs these full-size convs ~3x faster in NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        return self.out(x)


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with aligned corners (what InfoPro's decoder uses), as two small matrix
    products: the same numbers as ``F.interpolate``, several times faster on CPU forward and
    backward; a no-op at the same size."""
    h, w = size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    rows = _interp_matrix(x.shape[-2], h, x)
    cols = _interp_matrix(x.shape[-1], w, x)
    return rows @ x @ cols.T


def _interp_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_out, n_in) weights of 1-d linear interpolation with aligned corners."""
    m = torch.zeros(n_out, n_in, device=like.device)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m.to(like.dtype)
    pos = torch.arange(n_out, device=like.device) * ((n_in - 1) / (n_out - 1))
    low = pos.floor().long().clamp(max=n_in - 2)
    frac = pos - low
    idx = torch.arange(n_out, device=like.device)
    m[idx, low] = 1.0 - frac
    m[idx, low + 1] += frac
    return m.to(like.dtype)


def _scaled(width: int, widen: float) -> int:
    return max(1, int(width * widen))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1,
                  bias: bool = True) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


HEAD_PATTERN = re.compile(r"([0-9])c([1-9])f")


def make_classifier(channels: int, out: int, config: str = "1c2f", widen: float = 1.0,
                    hidden: int = 128) -> nn.Sequential:
    """InfoPro's auxiliary classifier ``<n>c<m>f``: n conv3x3-BN-ReLU, global average pooling,
    m linear layers (hidden width ``hidden*widen``, ReLU between) ending in ``out`` units.

    The first conv has stride 2 and doubles the width while C < 64 (16 -> 32, 32 -> 64 on
    CIFAR), else stride 1 at C; further convs keep width and size. Conv widths and the hidden
    width scale with ``widen``. ``1c2f`` is InfoPro's default, ``0c1f`` its "greedy SL" head.
    """
    match = HEAD_PATTERN.fullmatch(config)
    if match is None:
        raise ValueError(f"head must look like 1c2f (<convs>c<linear layers>f), got {config!r}")
    convs, fcs = int(match[1]), int(match[2])
    layers: list[nn.Module] = []
    width = channels
    for i in range(convs):
        stride = 2 if i == 0 and channels < 64 else 1
        nxt = _scaled(2 * channels if stride == 2 else channels, widen) if i == 0 else width
        layers += _conv_bn_relu(width, nxt, 3, stride, bias=False)
        width = nxt
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    hid = _scaled(hidden, widen)
    for _ in range(fcs - 1):
        layers += [nn.Linear(width, hid), nn.ReLU(inplace=True)]
        width = hid
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class InfoProHead(AuxHead):
    """One module's InfoPro head: ``loss = ixx * reconstruction + ixy * task``.

    ``decoder`` exists only when ixx > 0 and ``classifier`` only when ixy > 0; with both 0 the
    head is empty and its loss is 0 (a zero that still back-propagates, as the public code's
    ``0 * loss`` does). The task term is the supervised contrastive loss on a
    ``feature_dim``-d normalised projection (``contrast``) or cross-entropy on class logits
    (``ce``).
    """

    def __init__(self, shape: Shape, info: DataInfo, ixx: float, ixy: float,
                 loss: LossMode = "contrast", head: str = "1c2f", widen: float = 1.0,
                 feature_dim: int = 128, temperature: float = 0.07,
                 decoder: DecoderKind = "auto") -> None:
        super().__init__(shape, info)
        if ixx < 0 or ixy < 0:
            raise ValueError(f"need ixx >= 0 and ixy >= 0 (got {ixx}, {ixy})")
        self.ixx, self.ixy = float(ixx), float(ixy)
        self.mode, self.temperature = loss, temperature
        self.decoder = Decoder(shape, info.input_shape, widen, decoder) if ixx > 0 else None
        out = feature_dim if loss == "contrast" else info.num_classes
        self.classifier = (make_classifier(shape[0], out, head, widen, feature_dim)
                           if ixy > 0 else None)

    def target(self, images: Tensor) -> Tensor:
        """What the decoder must rebuild: the input image de-normalised, in [0, 1]."""
        return self.info.denormalize(images.detach())

    def reconstruct(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """The decoder's image (after the sigmoid), at ``size`` (default: the data's size)."""
        if self.decoder is None:
            raise RuntimeError("this head has ixx = 0 and no decoder")
        return torch.sigmoid(self.decoder(features, size or self.info.input_shape[1:]))

    def reconstruction_loss(self, features: Tensor, images: Tensor) -> Tensor:
        """Mean binary cross-entropy between the decoder's image and `target`; computed from
        logits, which is exact and safe under autocast."""
        assert self.decoder is not None
        logits = self.decoder(features, tuple(images.shape[-2:]))
        return F.binary_cross_entropy_with_logits(logits.float(), self.target(images).float())

    def task_loss(self, features: Tensor, targets: Tensor) -> Tensor:
        """Supervised contrastive loss or cross-entropy of the classifier head."""
        assert self.classifier is not None
        out = self.classifier(features)
        if self.mode == "contrast":
            return supcon_loss(out, hard_labels(targets), self.temperature)
        return cross_entropy(out.float(), targets)

    def loss(self, features: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        if self.decoder is None and self.classifier is None:  # both weights 0
            return features.float().sum() * 0.0
        total = features.new_zeros((), dtype=torch.float32)
        if self.decoder is not None:
            total = total + self.ixx * self.reconstruction_loss(features, images)
        if self.classifier is not None:
            total = total + self.ixy * self.task_loss(features, targets)
        return total
