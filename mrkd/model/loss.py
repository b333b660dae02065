"""Cosine distillation loss of RD4AD/MRKD on flattened feature maps."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_distillation_loss"]


def cosine_distillation_loss(teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor]) -> Tensor:
    """Sum over scales of the batch mean of 1 - cos(flatten(T_k), flatten(S_k)), in float32.

    Each sample's whole C*H*W map is one vector (not a per-pixel cosine: that form trains much worse).
    """
    if len(teacher_feats) != len(student_feats) or not teacher_feats:
        raise ValueError(f"need the same non-zero number of teacher and student scales, got "
                         f"{len(teacher_feats)} and {len(student_feats)}")
    total = torch.zeros((), dtype=torch.float32, device=teacher_feats[0].device)
    for scale, (teacher, student) in enumerate(zip(teacher_feats, student_feats)):
        if teacher.shape != student.shape:
            raise ValueError(f"scale {scale}: teacher shape {tuple(teacher.shape)} != student shape "
                             f"{tuple(student.shape)}")
        cosine = F.cosine_similarity(teacher.flatten(1).float(), student.flatten(1).float(), dim=1)
        total = total + (1.0 - cosine).mean()
    return total
