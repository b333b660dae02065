"""MRKDModel: frozen teacher + one-class bottleneck (OCBE) + student decoder + FLM generation blocks.

Channel recipe for a teacher with stage channels (C1, C2, C3) at strides 4, 8, 16 (RD4AD's BN_layer / de_resnet):

- OCBE: f4 -> 3x3 s2 conv+BN+ReLU (C1->C2) -> 3x3 s2 conv+BN+ReLU (C2->C3); f8 -> one (C2->C3); concat with f16
  (3*C3 at stride 16) -> one ResNet stage, stride 2 -> embedding 2*C3 at stride 32.
  wide_resnet50_2: 256->512->1024, 512->1024, 3072 -> 3 torchvision Bottlenecks (width 1024) -> 2048 x 8 x 8 at
  256 px, exactly the paper's. resnet18: 2 BasicBlocks -> 512 (RD4AD's resnet18 variant).
- Student: three upsampling stages (first block of each upsamples with 2x2 stride-2 transposed convs, main path
  and shortcut) producing C3 at stride 16, C2 at stride 8, C1 at stride 4.

Per-backbone choices (`STUDENT_SPECS`):

- wide_resnet50_2: Bottleneck stages of 3, 4, 6 blocks, width = out/2 (RD4AD de_wide_resnet50_2).
- resnet18: BasicBlock stages of 2, 2, 2 (RD4AD de_resnet18).
- mobilenet_v2 / efficientnet_lite0-2 (24-120 channels): Bottleneck stages of 2, 2, 2 blocks with width
  max(out, 64). A width of out/2 would be 12-16 channels at strides 4 and 8, too thin to restore the teacher's
  features; 64 keeps the stride-4 stage (the costly one: 64x64 positions at 256 px) affordable on a 2-core CPU.
  The OCBE stage has 2 Bottlenecks of width C3.

FLM: per scale a generation block Conv3x3 -> ReLU -> Conv3x3 (bias, channels kept). In training its input is the
student output with about `flm_ratio` of the positions zeroed (`masking.flm_mask`); it is a side branch, the next
decoder stage consumes the unmasked feature. In eval the block runs unmasked (deterministic) unless
`inference_mask=True` (the reference code's random test-time mask). `flm=False` is plain RD4AD.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..core.config import ModelConfig
from .backbones import Backbone, create_backbone
from .masking import flm_mask

__all__ = ["MRKDModel", "STUDENT_SPECS", "StudentSpec"]

BlockKind = Literal["bottleneck", "basic"]


@dataclass(frozen=True)
class StudentSpec:
    block: BlockKind
    decoder_blocks: tuple[int, int, int]  # deepest stage first: outputs at strides 16, 8, 4
    width_ratio: float = 0.5  # bottleneck width / stage output channels
    min_width: int = 0
    ocbe_blocks: int = 3


# the student of the slim mobile teachers (24-120 channels), also used for any backbone not listed
_SLIM_SPEC = StudentSpec("bottleneck", (2, 2, 2), width_ratio=1.0, min_width=64, ocbe_blocks=2)
STUDENT_SPECS: dict[str, StudentSpec] = {
    "wide_resnet50_2": StudentSpec("bottleneck", (3, 4, 6), width_ratio=0.5, ocbe_blocks=3),
    "resnet18": StudentSpec("basic", (2, 2, 2), ocbe_blocks=2),
    "mobilenet_v2": _SLIM_SPEC,
    "efficientnet_lite0": _SLIM_SPEC,
    "efficientnet_lite1": _SLIM_SPEC,
    "efficientnet_lite2": _SLIM_SPEC,
}


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class OneClassBottleneck(nn.Module):
    """OCBE: fuse the three teacher maps into one compact embedding at stride 32."""

    def __init__(self, channels: tuple[int, int, int], spec: StudentSpec) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.down4 = nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c3))
        self.down8 = _conv_bn_relu(c2, c3)
        in_ch, out_ch = 3 * c3, 2 * c3
        downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False), nn.BatchNorm2d(out_ch))
        blocks: list[nn.Module]
        if spec.block == "basic":
            blocks = [BasicBlock(in_ch, out_ch, stride=2, downsample=downsample)]
            blocks += [BasicBlock(out_ch, out_ch) for _ in range(spec.ocbe_blocks - 1)]
        else:
            if out_ch % 4:
                raise ValueError(f"OCBE bottleneck output {out_ch} is not divisible by 4")
            planes = out_ch // 4
            # torchvision width = planes * base_width / 64; base_width 128 = RD4AD's wide variant (width = C3).
            base_width = 128
            blocks = [Bottleneck(in_ch, planes, stride=2, downsample=downsample, base_width=base_width)]
            blocks += [Bottleneck(out_ch, planes, base_width=base_width) for _ in range(spec.ocbe_blocks - 1)]
        self.stage = nn.Sequential(*blocks)
        self.out_channels = out_ch

    def forward(self, feats: list[Tensor]) -> Tensor:
        f4, f8, f16 = feats
        return self.stage(torch.cat([self.down4(f4), self.down8(f8), f16], dim=1))


def _up_shortcut(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False), nn.BatchNorm2d(out_ch))


class UpBottleneck(nn.Module):
    """RD4AD decoder bottleneck: 1x1 -> (2x2 stride-2 transposed conv | 3x3) -> 1x1, residual.

    `final_relu=False` leaves the sum linear: the last block of a stage whose teacher tap is signed (a linear
    bottleneck output) must be able to produce negative values."""

    def __init__(self, in_ch: int, width: int, out_ch: int, upsample: bool, final_relu: bool = True) -> None:
        super().__init__()
        self.final_relu = final_relu
        self.conv1, self.bn1 = nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = (nn.ConvTranspose2d(width, width, 2, stride=2, bias=False) if upsample
                      else nn.Conv2d(width, width, 3, padding=1, bias=False))
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _up_shortcut(in_ch, out_ch) if upsample else (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)) if in_ch != out_ch
            else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        return self.relu(out) if self.final_relu else out


class UpBasicBlock(nn.Module):
    """RD4AD decoder basic block: (2x2 stride-2 transposed conv | 3x3) -> 3x3, residual (see UpBottleneck for
    `final_relu`)."""

    def __init__(self, in_ch: int, out_ch: int, upsample: bool, final_relu: bool = True) -> None:
        super().__init__()
        self.final_relu = final_relu
        self.conv1 = (nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2, bias=False) if upsample
                      else nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2, self.bn2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _up_shortcut(in_ch, out_ch) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.relu(out) if self.final_relu else out


class StudentDecoder(nn.Module):
    """Three upsampling stages; returns every stage output, ordered stride 4, 8, 16 like the teacher.

    `signed_outputs`: the teacher's taps take negative values (linear bottlenecks: MobileNetV2, EfficientNet-Lite),
    so each stage ends without a ReLU; post-ReLU taps (ResNets) keep RD4AD's final ReLU."""

    def __init__(self, in_ch: int, channels: tuple[int, int, int], spec: StudentSpec,
                 signed_outputs: bool = False) -> None:
        super().__init__()
        stages = []
        for out_ch, count in zip(reversed(channels), spec.decoder_blocks):
            blocks: list[nn.Module] = []
            for index in range(count):
                block_in = in_ch if index == 0 else out_ch
                final_relu = not (signed_outputs and index == count - 1)
                if spec.block == "basic":
                    blocks.append(UpBasicBlock(block_in, out_ch, upsample=index == 0, final_relu=final_relu))
                else:
                    width = max(int(out_ch * spec.width_ratio), spec.min_width)
                    blocks.append(UpBottleneck(block_in, width, out_ch, upsample=index == 0, final_relu=final_relu))
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        outputs = []
        x = embedding
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]


def _generation_block(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


def _init_rd4ad(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) is nn.Conv2d:  # RD4AD initialises Conv2d only (not transposed convs)
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MRKDModel(nn.Module):
    def __init__(self, backbone: str, flm: bool = True, flm_ratio: float = 0.2, inference_mask: bool = False,
                 teacher: Backbone | None = None) -> None:
        """`teacher`: the built backbone `backbone` names (mrkd.runtime.weights.load_backbone gives the pretrained
        one); None builds it with random weights (a checkpoint's state dict then fills it)."""
        super().__init__()
        if not 0.0 <= flm_ratio < 1.0:
            raise ValueError(f"flm_ratio must lie in [0, 1), got {flm_ratio}")
        self.backbone_name = backbone
        self.teacher: Backbone = teacher if teacher is not None else create_backbone(backbone)
        channels = self.teacher.channels
        spec = STUDENT_SPECS.get(backbone, _SLIM_SPEC)
        self.bottleneck = OneClassBottleneck(channels, spec)
        self.student = StudentDecoder(self.bottleneck.out_channels, channels, spec,
                                      signed_outputs=self.teacher.signed_taps)
        self.flm = flm
        self.flm_ratio = flm_ratio
        self.inference_mask = inference_mask
        self.generation = nn.ModuleList(_generation_block(c) for c in channels) if flm else None
        for module in (self.bottleneck, self.student, self.generation):
            if module is not None:
                _init_rd4ad(module)

    @classmethod
    def from_config(cls, cfg: ModelConfig, teacher: Backbone | None = None) -> "MRKDModel":
        return cls(cfg.backbone, flm=cfg.flm, flm_ratio=cfg.flm_ratio, inference_mask=cfg.inference_mask,
                   teacher=teacher)

    @property
    def channels(self) -> tuple[int, int, int]:
        return self.teacher.channels

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Bottleneck, student and generation blocks: what the optimiser updates."""
        for module in (self.bottleneck, self.student, self.generation):
            if module is not None:
                yield from module.parameters()

    def _generate(self, student_feats: list[Tensor]) -> list[Tensor]:
        assert self.generation is not None
        masked = self.training or self.inference_mask
        restored = []
        for feature, block in zip(student_feats, self.generation):
            if masked:
                batch, _, height, width = feature.shape
                keep = flm_mask(batch, height, width, self.flm_ratio, device=feature.device)
                feature = feature * keep.to(feature.dtype)
            restored.append(block(feature))
        return restored

    def restore(self, teacher_feats: list[Tensor]) -> list[Tensor]:
        """Student features from the teacher's: bottleneck -> student decoder -> (FLM) generation blocks."""
        student_feats = self.student(self.bottleneck(teacher_feats))
        return self._generate(student_feats) if self.generation is not None else student_feats

    def forward(self, x_input: Tensor, x_target: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher features of x_target, or of x_input when None; student features), strides 4, 8, 16."""
        if x_input.dim() != 4 or x_input.shape[1] != 3:
            raise ValueError(f"x_input must be a batch [B, 3, H, W], got shape {tuple(x_input.shape)}")
        if x_input.shape[-2] % 32 or x_input.shape[-1] % 32:
            raise ValueError(f"image height and width must be multiples of 32 (the embedding is at stride 32), "
                             f"got {tuple(x_input.shape[-2:])}")
        with torch.no_grad():
            if x_target is None:
                teacher_in = teacher_target = self.teacher(x_input)
            else:
                if x_target.shape != x_input.shape:
                    raise ValueError(f"x_target shape {tuple(x_target.shape)} != x_input shape "
                                     f"{tuple(x_input.shape)}")
                # One teacher pass over both batches (the teacher is in eval mode: samples are independent).
                both = self.teacher(torch.cat([x_input, x_target], dim=0))
                teacher_in = [f[: x_input.shape[0]] for f in both]
                teacher_target = [f[x_input.shape[0]:] for f in both]
        return teacher_target, self.restore(teacher_in)
