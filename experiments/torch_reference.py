"""PyTorch references of the jaxembed models: the BN-Inception port and the template heads and losses.

Used by `tests/test_pretrained.py` (the BN-Inception port, to check weight import) and by
`experiments/benchmark.py` (the same template models in PyTorch, to compare speed). Needs torch;
torchvision is imported only by `torchvision_backbone`, never at import time: torchvision imports
triton, which segfaults in a process that has already loaded TensorFlow (as `jaxembed.data` does).

The heads mirror `jaxembed/models/heads.py`: raw RGB pixels in [0, 255] are ImageNet-normalised inside
the model (elementwise, so a channels_last input stays channels_last), and the heads run in float32
even under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# The BN-Inception port's blocks (Cadene's pretrainedmodels `bninception`), in order:
# (name, 1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3, pool_proj); 1x1 = pool_proj = 0 in the
# reduction blocks, whose 3x3 convs have stride 2 and whose pool (3x3/2 max) is not projected.
PORT_BLOCKS = (
    ("inception_3a", 64, 64, 64, 64, 96, 32),
    ("inception_3b", 64, 64, 96, 64, 96, 64),
    ("inception_3c", 0, 128, 160, 64, 96, 0),
    ("inception_4a", 224, 64, 96, 96, 128, 128),
    ("inception_4b", 192, 96, 128, 96, 128, 128),
    ("inception_4c", 160, 128, 160, 128, 160, 128),
    ("inception_4d", 96, 128, 192, 160, 192, 128),
    ("inception_4e", 0, 128, 192, 192, 256, 0),
    ("inception_5a", 352, 192, 320, 160, 224, 128),
    ("inception_5b", 352, 192, 320, 192, 224, 128),
)


def _max_pool_s2_same(x: torch.Tensor) -> torch.Tensor:
    """3x3/2 max pool with TensorFlow's "SAME" padding, as jaxembed's BN-Inception: ceil(H/2) outputs.

    At even sizes this equals torch's ceil_mode pool; at odd sizes it pads (1, 1), so the reduction
    blocks' pool and stride-2 conv branches agree in size and can be concatenated.
    """
    pads = []
    for size in reversed(x.shape[-2:]):  # F.pad lists the last axis first
        total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=-math.inf), 3, 2)


class BNInceptionPort(nn.Module):
    """A torch module with the BN-Inception port's names, layers and forward pass.

    Like the port: biased convs, each followed by BatchNorm2d (eps 1e-5) and ReLU; ceil_mode max
    pools; 3x3/1 average pools counting padding, except a max pool in inception_5b. Unlike it, a
    global average pool replaces the fixed 7x7 one so that it runs at any size.

    Args:
      num_classes: the width of `last_linear`; None: no classifier, `forward` returns the pooled
        (B, 1024) features.
      same_pool: stride-2 max pools with "SAME" padding (jaxembed's choice, which runs at every size
        such as 112 px) instead of the port's ceil_mode (which fails at 112 px); the two agree
        wherever the pooled feature maps have even sides.

    `forward(x)`: x (B, 3, H, W) normalised float -> logits (B, num_classes) or features (B, 1024).
    """

    feature_dim = 1024

    def __init__(self, num_classes: int | None, *, same_pool: bool = False):
        super().__init__()
        self.same_pool = same_pool
        self._conv("conv1_7x7_s2", 3, 64, kernel=7, stride=2)
        self._conv("conv2_3x3_reduce", 64, 64)
        self._conv("conv2_3x3", 64, 192, kernel=3)
        channels = 192
        for name, c1x1, r3x3, c3x3, rdouble, cdouble, proj in PORT_BLOCKS:
            stride = 1 if c1x1 else 2
            if c1x1:
                self._conv(f"{name}_1x1", channels, c1x1)
            self._conv(f"{name}_3x3_reduce", channels, r3x3)
            self._conv(f"{name}_3x3", r3x3, c3x3, kernel=3, stride=stride)
            self._conv(f"{name}_double_3x3_reduce", channels, rdouble)
            self._conv(f"{name}_double_3x3_1", rdouble, cdouble, kernel=3)
            self._conv(f"{name}_double_3x3_2", cdouble, cdouble, kernel=3, stride=stride)
            if proj:
                self._conv(f"{name}_pool_proj", channels, proj)
            channels = c1x1 + c3x3 + cdouble + (proj or channels)
        assert channels == self.feature_dim
        self.last_linear = nn.Linear(channels, num_classes) if num_classes else nn.Identity()

    def _conv(self, name, cin, cout, kernel=1, stride=1):
        setattr(self, name, nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2))
        setattr(self, f"{name}_bn", nn.BatchNorm2d(cout, eps=1e-5))

    def _run(self, name, x):
        return F.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))

    def _max_pool_s2(self, x):
        return _max_pool_s2_same(x) if self.same_pool else F.max_pool2d(x, 3, 2, ceil_mode=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> globally average-pooled (B, 1024) features."""
        x = self._max_pool_s2(self._run("conv1_7x7_s2", x))
        x = self._run("conv2_3x3", self._run("conv2_3x3_reduce", x))
        x = self._max_pool_s2(x)
        for name, c1x1, _, _, _, _, proj in PORT_BLOCKS:
            branches = [self._run(f"{name}_1x1", x)] if c1x1 else []
            branches.append(self._run(f"{name}_3x3", self._run(f"{name}_3x3_reduce", x)))
            y = self._run(f"{name}_double_3x3_1", self._run(f"{name}_double_3x3_reduce", x))
            branches.append(self._run(f"{name}_double_3x3_2", y))
            if not proj:
                branches.append(self._max_pool_s2(x))
            elif name == "inception_5b":
                branches.append(self._run(f"{name}_pool_proj", F.max_pool2d(x, 3, 1, 1, ceil_mode=True)))
            else:
                y = F.avg_pool2d(x, 3, 1, 1, ceil_mode=True, count_include_pad=True)
                branches.append(self._run(f"{name}_pool_proj", y))
            x = torch.cat(branches, dim=1)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_linear(self.features(x))


# ----------------------------------------------------------------------------- template models


def torchvision_backbone(arch: str) -> tuple[nn.Module, int]:
    """(torchvision `arch` without its classifier, returning pooled features; their width)."""
    import torchvision  # here, not at import time: see the module docstring

    model = getattr(torchvision.models, arch)(weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, feature_dim


def backbone(arch: str) -> tuple[nn.Module, int]:
    """(the backbone `arch` returning pooled float features (B, feature_dim); feature_dim)."""
    if arch == "inception_bn":
        return BNInceptionPort(None, same_pool=True), BNInceptionPort.feature_dim
    return torchvision_backbone(arch)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) raw RGB in [0, 255], uint8 or float -> ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN_255, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=eps * eps))


class ClassifierModel(nn.Module):
    """Backbone + linear classifier, like jaxembed's: {"embedding", "logits"} float32 (B, ...)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> dict:
        features = self.backbone(normalize_images(images))
        with torch.autocast(features.device.type, enabled=False):  # the head in float32
            features = features.float()
            return {"embedding": l2_normalize(features), "logits": self.classifier(features)}


class ArcFaceModel(nn.Module):
    """Backbone + insightface's "E" head (BN-Dropout-Linear-BN without scale) + class centres.

    Like jaxembed's: {"embedding": L2-normalised head output, "features": the head output}, and the
    `centers` (embeddings_size, num_classes) read by `arcface_loss`.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, embeddings_size: int, num_classes: int,
                 dropout_rate: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.centers = nn.Parameter(torch.randn(embeddings_size, num_classes) * 0.01)
        self.feature_bn = nn.BatchNorm1d(feature_dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout_rate)
        # No bias, as jaxembed's embedding_fc: the batch norm right after subtracts it again.
        self.embedding_fc = nn.Linear(feature_dim, embeddings_size, bias=False)
        self.embedding_bn = nn.BatchNorm1d(embeddings_size, eps=1e-5, affine=False)
        self.embedding_bias = nn.Parameter(torch.zeros(embeddings_size))  # the BN's shift; no scale

    def forward(self, images: torch.Tensor) -> dict:
        features = self.backbone(normalize_images(images))
        with torch.autocast(features.device.type, enabled=False):
            x = self.embedding_fc(self.dropout(self.feature_bn(features.float())))
            x = self.embedding_bn(x) + self.embedding_bias
            return {"embedding": l2_normalize(x), "features": x}


def arcface_loss(embeddings, centers, labels, *, scale: float, margin: float, eps: float = 1e-7):
    """`jaxembed.losses.arcface_loss` in torch: mean softmax CE over scaled cosines with the margin."""
    embeddings = embeddings * torch.rsqrt(torch.clamp((embeddings**2).sum(-1, keepdim=True), min=eps * eps))
    centers = centers * torch.rsqrt(torch.clamp((centers**2).sum(0, keepdim=True), min=eps * eps))
    cosine = embeddings @ centers
    cos_target = cosine.gather(1, labels[:, None])
    sin_target = torch.sqrt(torch.clamp(1.0 - cos_target * cos_target, min=eps))
    with_margin = cos_target * math.cos(margin) - sin_target * math.sin(margin)
    fallback = cos_target - margin * math.sin(margin)
    target = torch.where(cos_target >= math.cos(math.pi - margin), with_margin, fallback)
    return F.cross_entropy(scale * cosine.scatter(1, labels[:, None], target), labels)


def template_model(head: str, arch: str, num_classes: int, *, embeddings_size: int = 512) -> nn.Module:
    """The template model (`head` "arcface" or "classifier") on the backbone `arch`."""
    features, feature_dim = backbone(arch)
    if head == "arcface":
        return ArcFaceModel(features, feature_dim, embeddings_size, num_classes)
    return ClassifierModel(features, feature_dim, num_classes)


def template_loss(head: str, *, logreg: int = 0, angular_scale: float = 64.0, angular_margin: float = 0.5):
    """`loss(model, outputs, batch) -> scalar`, like the loss of `jaxembed.tasks.for_config(config).loss_fn()`.

    batch: `label` int64 (B,), `labels` float32 (B, C) multi-hot.
    """
    if head == "arcface":
        return lambda model, outputs, batch: arcface_loss(
            outputs["features"], model.centers, batch["label"], scale=angular_scale, margin=angular_margin)
    if logreg:  # sigmoid CE summed over concepts, averaged over the batch
        return lambda model, outputs, batch: F.binary_cross_entropy_with_logits(
            outputs["logits"], batch["labels"], reduction="sum") / outputs["logits"].shape[0]
    return lambda model, outputs, batch: F.cross_entropy(outputs["logits"], batch["label"])


def sgd(model: nn.Module, *, learning_rate: float, momentum: float = 0.9, weight_decay: float = 5e-4):
    """SGD with momentum and weight decay on kernels and centres only, like jaxembed's default optimiser."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, momentum=momentum)
