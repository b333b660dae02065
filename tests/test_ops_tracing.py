"""The fused operator under tracing: its registered fake (`torch.library.register_fake`) gives the shapes and
dtypes of the real op, so torch.compile(fullgraph=True) and torch.export trace through it and the compiled result
equals eager."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mrkd.ops import anomaly_map_reference, native_available

pytestmark = [pytest.mark.skipif(not native_available(), reason="mrkd._C is not built"), pytest.mark.slow]  # compiles

SHAPES = [(64, 16, 16), (128, 8, 8), (256, 4, 4)]


def features(batch: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(batch, c, h, w, generator=generator).to(dtype) for c, h, w in SHAPES]
    student = [torch.randn(batch, c, h, w, generator=generator).to(dtype) for c, h, w in SHAPES]
    return teacher, student


def fused(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.mrkd.anomaly_map(teacher, student, [48, 40], 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_gives_the_real_ops_shapes_and_dtypes(dtype: torch.dtype):
    teacher, student = features(3, dtype)
    real_maps, real_scores = fused(teacher, student)
    with FakeTensorMode() as mode:
        fake_maps, fake_scores = fused([mode.from_tensor(t) for t in teacher], [mode.from_tensor(s) for s in student])
    for fake, real in ((fake_maps, real_maps), (fake_scores, real_scores)):
        assert (tuple(fake.shape), fake.dtype, fake.device) == (tuple(real.shape), real.dtype, real.device)
    assert tuple(real_maps.shape) == (3, 1, 48, 40) and real_scores.dtype == torch.float32


def test_compiled_fullgraph_equals_eager_and_the_reference():
    teacher, student = features(2, seed=1)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    maps, scores = compiled(teacher, student)
    eager_maps, eager_scores = fused(teacher, student)
    torch.testing.assert_close(maps, eager_maps, rtol=0, atol=0)
    torch.testing.assert_close(scores, eager_scores, rtol=0, atol=0)
    ref_maps, ref_scores = anomaly_map_reference(teacher, student, (48, 40), 2.0)
    torch.testing.assert_close(maps, ref_maps, rtol=1e-4, atol=1e-5)


def test_torch_export_traces_the_op_and_runs_like_eager():
    class Head(torch.nn.Module):
        def forward(self, t0, t1, t2, s0, s1, s2):
            return torch.ops.mrkd.anomaly_map([t0, t1, t2], [s0, s1, s2], [48, 40], 2.0)

    teacher, student = features(2, seed=2)
    program = torch.export.export(Head(), (*teacher, *student))
    assert any(node.target is torch.ops.mrkd.anomaly_map.default for node in program.graph.nodes)
    maps, scores = program.module()(*teacher, *student)
    eager_maps, eager_scores = fused(teacher, student)
    torch.testing.assert_close(maps, eager_maps, rtol=0, atol=0)
    torch.testing.assert_close(scores, eager_scores, rtol=0, atol=0)
