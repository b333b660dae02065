"""Anomaly map: per-scale cosine distance, bilinear upsampling, sum (or product), Gaussian smoothing, max.

`anomaly_map` runs the fused C++/CUDA operator `torch.ops.mrkd.anomaly_map` (kernels/, built as `mrkd._C`);
`anomaly_map_reference` is the same computation in plain PyTorch.

Non-finite features: a NaN or an infinity anywhere in an image's teacher or student features makes that image's
score NaN (in both implementations), even where the bilinear step never reads the bad pixel; the map holds NaN
wherever the bad value reaches. A NaN score is never "normal": see `runtime.calibration.Calibration.is_anomalous`.

A score reference (mean, scale), two [H, W] maps fitted on normal images (runtime.reference), makes the image score
the maximum of the standardised score map, (map - mean) / scale, instead of its raw maximum: a pixel that is hot on
every normal part (a solar cell's busbar, an edge) no longer sets the score. A plain-PyTorch step after the operator,
the same in both implementations.

A map whitening ((mean, matrix) per heat-map tap, fitted on normal images' residuals: runtime.whitening) moves the
map's teacher and student features into a space where each direction of their difference is weighed by how little it
varies on normal images (`whiten`), so normal grain the student never restores exactly no longer lights the map. A
plain-PyTorch step before the operator, the same in both implementations; the score's own taps are not whitened.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:
    from mrkd import _C  # noqa: F401  (importing registers torch.ops.mrkd.anomaly_map)

    _NATIVE_ERROR: str | None = None
except ImportError as exc:  # the extension is not built: plain-PyTorch fallback
    _NATIVE_ERROR = str(exc)

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default: each norm is clamped to >= eps
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default
MAX_BLUR_RADIUS = 1 << 20  # pixels; the kernels' limit (kernels/anomaly_map.h kMaxBlurRadius), sigma up to ~262144
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMBINES = ("sum", "product")  # how the per-scale distances become one map (see _check_combine)

_fallback_warned = False


if _NATIVE_ERROR is None:

    @torch.library.register_fake("mrkd::anomaly_map")
    def _anomaly_map_fake(
        teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], out_size: Sequence[int], sigma: float = 4.0,
        product: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the op returns, without computing it (torch.compile, torch.export, FakeTensor tracing): maps
        [B, 1, H, W] and scores [B], float32 whatever the features' dtype, on the features' device."""
        batch = teacher[0].shape[0]
        maps = teacher[0].new_empty((batch, 1, out_size[0], out_size[1]), dtype=torch.float32)
        return maps, teacher[0].new_empty((batch,), dtype=torch.float32)


def native_available() -> bool:
    """Whether the compiled operator (mrkd._C) is loaded and used by `anomaly_map`."""
    return _NATIVE_ERROR is None


def _geometric_root(values: torch.Tensor, n: int) -> torch.Tensor:
    """The n-th root, sign kept (rounding can make a distance a hair below 0): a smoothed product of n distances
    back on the distances' scale, like their geometric mean. Monotone, so it ranks pixels and images as the product
    does; it keeps heat-map values (and per-image thresholds spaced evenly between a map's min and max, as the
    papers' AU-PRO protocol spaces them) from crowding near 0."""
    return values if n == 1 else values.sign() * values.abs().pow(1.0 / n)


def _check_combine(combine: str) -> None:
    """How the upsampled per-scale distances become one map: "sum" (the paper's) or "product" (RD4AD's and
    anomalib's "multiply" mode; see core.config.DEFAULT_MAP_COMBINE)."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be 'sum' or 'product', got {combine!r}")


def _validate(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], out_size: Sequence[int], sigma: float
) -> tuple[int, int]:
    """Raise ValueError naming the problem; return out_size as (height, width)."""
    if isinstance(teacher, torch.Tensor) or isinstance(student, torch.Tensor):
        raise ValueError("teacher and student must be lists of tensors (one per scale), not a tensor")
    if len(teacher) == 0 or len(student) == 0:
        raise ValueError(f"teacher and student must not be empty lists (got {len(teacher)} and {len(student)})")
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} scales but student has {len(student)}")
    if len(out_size) != 2:
        raise ValueError(f"out_size must be (height, width), got {tuple(out_size)}")
    height, width = (int(v) for v in out_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"out_size must be positive, got ({height}, {width})")
    if not math.isfinite(float(sigma)) or float(sigma) < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if GAUSSIAN_TRUNCATE * float(sigma) + 0.5 > MAX_BLUR_RADIUS:
        raise ValueError(
            f"sigma {sigma:g} needs a blur radius of {GAUSSIAN_TRUNCATE * float(sigma) + 0.5:.0f} pixels, more than "
            f"the supported {MAX_BLUR_RADIUS}"
        )
    first = teacher[0]
    for k, (t, s) in enumerate(zip(teacher, student)):
        for name, x in (("teacher", t), ("student", s)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name}[{k}] is {type(x).__name__}, not a torch.Tensor")
            if x.dim() != 4:
                raise ValueError(f"{name}[{k}] must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
            if x.device != first.device:
                raise ValueError(f"mixed devices: {name}[{k}] is on {x.device} but teacher[0] is on {first.device}")
            if x.dtype != first.dtype:
                raise ValueError(f"mixed dtypes: {name}[{k}] is {x.dtype} but teacher[0] is {first.dtype}")
            if x.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"unsupported dtype {x.dtype}; expected float32, float16 or bfloat16")
            if x.shape[0] != first.shape[0]:
                raise ValueError(
                    f"batch mismatch: {name}[{k}] has batch {x.shape[0]} but teacher[0] has {first.shape[0]}"
                )
            if min(x.shape) == 0:
                raise ValueError(f"{name}[{k}] has an empty dimension: shape {tuple(x.shape)}")
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch at scale {k}: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
    return height, width


def gaussian_radius(sigma: float) -> int:
    """Kernel radius like scipy: int(truncate * sigma + 0.5); 0 (no blur) for sigma == 0."""
    return int(GAUSSIAN_TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def gaussian_kernel1d(sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised 1-D Gaussian (2r+1 taps, computed in float64 like scipy), float32."""
    radius = gaussian_radius(sigma)
    if radius == 0:
        return torch.ones(1, dtype=torch.float32, device=device)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (sigma * sigma) * x * x)
    return (phi / phi.sum()).to(device=device, dtype=torch.float32)


def reflect_indices(size: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Source index of each position of a line padded by `radius` on both sides, scipy "reflect" mode
    (d c b a | a b c d | d c b a), repeating the reflection when radius exceeds size."""
    positions = torch.arange(-radius, size + radius, device=device)
    period = 2 * size
    folded = torch.remainder(positions, period)
    return torch.where(folded < size, folded, period - 1 - folded)


def local_average(features: Sequence[torch.Tensor], pool: int) -> list[torch.Tensor]:
    """Each [B, C, H, W] map averaged over the pool x pool neighbourhood of every position (stride 1, same size;
    border positions average the pixels inside the map). pool 1 returns the maps as they are."""
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"the feature pool must be an odd size >= 1, got {pool}")
    if pool == 1:
        return list(features)
    return [_window_mean(f, pool) for f in features]


def _window_mean(features: torch.Tensor, pool: int) -> torch.Tensor:
    """F.avg_pool2d(pool, stride 1, padding pool // 2, count_include_pad=False) as separable shifted sums over a
    zero border, divided by each window's pixel count inside the map; accumulated in float32. On CPU it is about 4x
    faster than avg_pool2d on the product's taps and 1.3x on large batches of wide maps (`python
    benchmarks/anomaly_map.py --pool 3`), and it runs on every image."""
    radius = pool // 2
    total = F.pad(features.float(), (radius, radius, radius, radius))
    counts = []
    for dim in (-1, -2):
        size = total.shape[dim] - 2 * radius
        window_sum = total.narrow(dim, 0, size).clone()  # in place from here: fewer passes over large maps
        for offset in range(1, pool):
            window_sum.add_(total.narrow(dim, offset, size))
        total = window_sum
        index = torch.arange(size, device=features.device)
        counts.append((torch.clamp(index + radius, max=size - 1) - torch.clamp(index - radius, min=0) + 1).float())
    width_counts, height_counts = counts
    return total.div_(height_counts[:, None] * width_counts[None, :]).to(features.dtype)


def _selected(features: Sequence[torch.Tensor], scales: Sequence[int] | None, pool: int) -> list[torch.Tensor]:
    if scales is not None:
        if not scales or any(not 0 <= i < len(features) for i in scales):
            raise ValueError(f"scales must be indices of the {len(features)} feature maps, got {list(scales)}")
        features = [features[i] for i in scales]
    return local_average(features, pool)


def _pool_once(features: Sequence[Sequence[torch.Tensor]], scales: Sequence[int] | None,
               score_scales: Sequence[int] | None, pool: int) -> list[list[torch.Tensor]]:
    """Teacher and student with every tap that the map (`scales`, None = all) or the score reads averaged
    (local_average), the others as they are: when the score makes its own pass, the two passes share one average
    per tap and take pool 1."""
    read = None if scales is None or score_scales is None else set(scales) | set(score_scales)
    return [[local_average([f], pool)[0] if read is None or i in read else f for i, f in enumerate(taps)]
            for taps in features]


def _left_out_non_finite(features: Sequence[Sequence[torch.Tensor]],
                         scales: Sequence[int] | None) -> torch.Tensor | None:
    """[B] bool: images with a NaN/Inf in a feature map that `scales` leaves out (None when none is left out). A
    broken network must not score as normal because its broken part is not read."""
    left_out = [f[i] for f in features for i in range(len(f)) if scales is not None and i not in scales]
    if not left_out:
        return None
    return torch.stack([~torch.isfinite(f).flatten(1).all(dim=1) for f in left_out]).any(dim=0)


def _flag_left_out(result: tuple[torch.Tensor, torch.Tensor],
                   invalid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    maps, scores = result
    return (maps, scores) if invalid is None else (maps, scores.masked_fill(invalid.to(scores.device), float("nan")))


def whiten(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
           whitening: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each tap's features moved into the whitened space of normal residuals: with (mean [C], matrix [C, C]) per
    tap, teacher -> matrix @ unit(teacher) and student -> matrix @ (unit(student) + mean), per position (float32).
    The cosine distance of the pair then weighs each direction of the residual unit(teacher) - unit(student) by how
    little it varies on normal images (`matrix` is a square root of the inverse covariance of those residuals, `mean`
    their mean; mrkd.runtime.whitening fits both). A NaN or infinite feature value still gives a NaN at its pixel."""
    if len(whitening) != len(teacher):
        raise ValueError(f"whitening has {len(whitening)} taps but the map reads {len(teacher)}")
    out_teacher, out_student = [], []
    for k, (t, s, (mean, matrix)) in enumerate(zip(teacher, student, whitening)):
        channels = t.shape[1]
        if tuple(mean.shape) != (channels,) or tuple(matrix.shape) != (channels, channels):
            raise ValueError(f"whitening of tap {k} is {list(mean.shape)} / {list(matrix.shape)} but the tap has "
                             f"{channels} channels")
        matrix = matrix.to(t.device, torch.float32)
        unit_t = F.normalize(t.float(), dim=1, eps=COSINE_EPS)
        unit_s = F.normalize(s.float(), dim=1, eps=COSINE_EPS) + mean.to(t.device, torch.float32).view(1, -1, 1, 1)
        out_teacher.append(torch.einsum("dc,bchw->bdhw", matrix, unit_t).contiguous())
        out_student.append(torch.einsum("dc,bchw->bdhw", matrix, unit_s).contiguous())
    return out_teacher, out_student


def reflect_pad(maps: torch.Tensor, radius: int, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """Pad the given dims of `maps` by `radius` with scipy's "reflect" border (any radius)."""
    for dim in dims:
        maps = maps.index_select(dim, reflect_indices(maps.shape[dim], radius, maps.device))
    return maps


def gaussian_blur_reference(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, 1, H, W] float32 maps, equal to scipy.ndimage.gaussian_filter(
    mode="reflect", truncate=4) per image.

    Plain float32 multiply-adds of shifted slices, on purpose not conv2d: on CUDA, cuDNN runs float32
    convolutions in TF32 by default (about 1e-3 off), and this is what the kernels are checked against."""
    radius = gaussian_radius(sigma)
    if radius == 0:
        return maps
    weights = gaussian_kernel1d(sigma).tolist()
    for dim in (-1, -2):
        size = maps.shape[dim]
        padded = reflect_pad(maps, radius, dims=(dim,))
        blurred = padded.narrow(dim, 0, size) * weights[0]
        for k in range(1, 2 * radius + 1):
            blurred.add_(padded.narrow(dim, k, size), alpha=weights[k])
        maps = blurred
    return maps


def _distance_sum(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], out_size: tuple[int, int]
) -> torch.Tensor:
    """Sum over scales of the upsampled (align_corners=True) 1 - cosine similarity, [B, 1, H, W] float32."""
    return _distances(teacher, student, out_size)[0]


def _distances(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], out_size: tuple[int, int],
    combine: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the upsampled (align_corners=True) 1 - cosine similarities summed or multiplied over scales, [B, 1, H, W]
    float32; [B] bool: the image has a non-finite cosine distance at some feature pixel of some scale).

    A NaN or infinite feature value always gives a NaN distance at its pixel (inf / inf, inf * 0, inf - inf)."""
    total = None
    invalid = None
    for t, s in zip(teacher, student):
        distance = 1.0 - F.cosine_similarity(t.float(), s.float(), dim=1, eps=COSINE_EPS)
        bad = ~torch.isfinite(distance).flatten(1).all(dim=1)
        invalid = bad if invalid is None else invalid | bad
        upsampled = F.interpolate(distance.unsqueeze(1), size=out_size, mode="bilinear", align_corners=True)
        if total is None:
            total = upsampled
        else:
            total = total * upsampled if combine == "product" else total + upsampled
    assert total is not None and invalid is not None
    return total, invalid


def _score_from(score_taps: tuple[torch.Tensor, torch.Tensor] | None,
                result: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The map of `result` with the score of `score_taps` (the max of their own smoothed map); an image whose map
    read a NaN/Inf keeps a NaN score whatever the score's taps say."""
    if score_taps is None:
        return result
    maps, map_scores = result
    return maps, score_taps[1].masked_fill(torch.isnan(map_scores), float("nan"))


def _standardize_score(result: tuple[torch.Tensor, torch.Tensor],
                       reference: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`result`'s maps with the score max((map - mean) / scale) of `reference`; a NaN score stays NaN (a bad feature
    value the map does not read)."""
    if reference is None:
        return result
    maps, scores = result
    mean, scale = reference
    if tuple(mean.shape) != tuple(maps.shape[-2:]) or tuple(scale.shape) != tuple(maps.shape[-2:]):
        raise ValueError(f"the score reference is {list(mean.shape)} / {list(scale.shape)} but the maps are "
                         f"{list(maps.shape[-2:])}: it was fitted at another image size")
    standardized = (maps[:, 0] - mean.to(maps.device, torch.float32)) / scale.to(maps.device, torch.float32)
    return maps, standardized.flatten(1).amax(dim=1).masked_fill(torch.isnan(scores), float("nan"))


def _splits(scales: Sequence[int] | None, score_scales: Sequence[int] | None, combine: str,
            whitened: bool = False) -> bool:
    """Whether the score needs its own pass over the features: it reads other taps than the map, or the same taps
    summed while the map multiplies them, or unwhitened while the map is whitened."""
    if score_scales is None:
        return False
    return scales is None or sorted(score_scales) != sorted(scales) or combine != "sum" or whitened


@torch.no_grad()
def anomaly_map_reference(
    teacher: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    sigma: float = 4.0,
    scales: Sequence[int] | None = None,
    pool: int = 1,
    score_scales: Sequence[int] | None = None,
    score_reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    combine: str = "sum",
    whitening: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch anomaly map: (maps [B, 1, H, W] float32, scores [B] float32; NaN for an image with a
    non-finite feature value). See `anomaly_map` for the arguments."""
    _check_combine(combine)
    score = None
    if _splits(scales, score_scales, combine, whitening is not None):
        (teacher, student), pool = _pool_once((teacher, student), scales, score_scales, pool), 1
        score = anomaly_map_reference(teacher, student, out_size, sigma, score_scales, pool,
                                      score_reference=score_reference)
    left_out = _left_out_non_finite((teacher, student), scales)
    teacher, student = _selected(teacher, scales, pool), _selected(student, scales, pool)
    size = _validate(teacher, student, out_size, sigma)
    if whitening is not None:
        teacher, student = whiten(teacher, student, whitening)
    summed, invalid = _distances(teacher, student, size, combine)
    maps = gaussian_blur_reference(summed, float(sigma)).contiguous()
    if combine == "product":
        maps = _geometric_root(maps, len(teacher))
    scores = maps.flatten(1).amax(dim=1)
    result = _flag_left_out((maps, scores.masked_fill(invalid, float("nan"))), left_out)
    return _score_from(score, result if score is not None else _standardize_score(result, score_reference))


@torch.no_grad()
def anomaly_map(
    teacher: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    out_size: tuple[int, int],
    sigma: float = 4.0,
    scales: Sequence[int] | None = None,
    pool: int = 1,
    score_scales: Sequence[int] | None = None,
    score_reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    combine: str = "sum",
    whitening: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused anomaly map: (maps [B, 1, H, W] float32, scores [B] float32, the max of each smoothed map).

    `scales` picks the feature pairs to use (default all) and `pool` averages each over a pool x pool
    neighbourhood first (see local_average; 1 = none): both in PyTorch, before the fused operator.
    Per scale 1 - cosine similarity over channels, bilinear upsampling (align_corners=True) to out_size, sum
    over scales (`combine="product"`: their product), Gaussian blur (sigma, truncated at 4 sigma, scipy "reflect"
    border; sigma 0 = none), max. A product map (and its max) of n scales comes back as its n-th root, on the
    distances' scale (`_geometric_root`; in PyTorch after the operator).
    `score_scales` (default: `scales`) lets the image score read other taps than the heat map: the score is then
    the max of the smoothed map of those taps, always summed (a second call of the operator, on the same averaged
    features: each tap is averaged once), the maps stay those of `scales`.
    `score_reference` (mean, scale), [H, W] each: the score is the max of (score map - mean) / scale instead (see
    the module's docstring). `whitening` ((mean [C], matrix [C, C]) per tap of the map): the map's taps are
    whitened first (see `whiten`: each residual direction weighed by how little it varies on normal images); the
    score's own pass (`score_scales`) stays unwhitened. Plain PyTorch before the fused operator.
    An image with a NaN or infinite feature value anywhere gets a NaN score.
    """
    global _fallback_warned
    _check_combine(combine)
    score = None
    if _splits(scales, score_scales, combine, whitening is not None):
        (teacher, student), pool = _pool_once((teacher, student), scales, score_scales, pool), 1
        score = anomaly_map(teacher, student, out_size, sigma, score_scales, pool, score_reference=score_reference)
    left_out = _left_out_non_finite((teacher, student), scales)
    teacher, student = _selected(teacher, scales, pool), _selected(student, scales, pool)
    height, width = _validate(teacher, student, out_size, sigma)
    if whitening is not None:
        teacher, student = whiten(teacher, student, whitening)
    if not native_available():
        if not _fallback_warned:
            _fallback_warned = True
            warnings.warn(
                f"mrkd._C is not built ({_NATIVE_ERROR}); anomaly_map uses the slower PyTorch reference. "
                "Build it with `python setup.py build_ext --inplace`.",
                RuntimeWarning,
                stacklevel=2,
            )
        result = _flag_left_out(anomaly_map_reference(teacher, student, (height, width), sigma, combine=combine),
                                left_out)
    else:
        maps, scores = torch.ops.mrkd.anomaly_map(list(teacher), list(student), [height, width], float(sigma),
                                                  combine == "product")
        if combine == "product":
            maps, scores = _geometric_root(maps, len(teacher)), _geometric_root(scores, len(teacher))
        result = _flag_left_out((maps, scores), left_out)
    return _score_from(score, result if score is not None else _standardize_score(result, score_reference))
