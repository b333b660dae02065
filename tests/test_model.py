"""Backbones (real ImageNet weights), MRKDModel structure and modes, and the distillation loss."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision

from mrkd.core.config import ModelConfig
from mrkd.core.preprocess import normalize, prepare_batch
from mrkd.data import open_dataset
from mrkd.model.backbones import available_backbones
from mrkd.model.loss import cosine_distillation_loss
from mrkd.model.network import MRKDModel
from mrkd.runtime.weights import MissingWeightsError, imagenet_classifier, load_backbone

EXPECTED_CHANNELS = {
    "wide_resnet50_2": (256, 512, 1024),
    "resnet18": (64, 128, 256),
    "mobilenet_v2": (24, 32, 96),
    "efficientnet_lite0": (24, 40, 112),
    "efficientnet_lite1": (24, 40, 112),
    "efficientnet_lite2": (24, 48, 120),
}
WITH_SHIPPED_WEIGHTS = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Index of the last block of the stride-4, -8 and -16 stages, read off each weight file's block list (where the
# `_project_conv` output channels last take the tap's width before the next stride).
LITE_TAP_BLOCKS = {"efficientnet_lite0": (2, 4, 10), "efficientnet_lite1": (3, 6, 14),
                   "efficientnet_lite2": (3, 6, 14)}


def photos(size: int, names=("chelsea", "coffee", "astronaut", "rocket")) -> torch.Tensor:
    return normalize(prepare_batch([getattr(skimage.data, n)() for n in names], size))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_lists_every_backbone():
    assert available_backbones() == sorted(EXPECTED_CHANNELS)
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'.*mobilenet_v2"):
        load_backbone("resnet9000")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "wide_resnet50_2" else n
                                  for n in sorted(EXPECTED_CHANNELS)])  # the paper's backbone: 18 s here
def test_model_shapes_frozen_teacher_and_student_match(name):
    model = MRKDModel(name, teacher=load_backbone(name, pretrained=name in WITH_SHIPPED_WEIGHTS))
    assert model.channels == EXPECTED_CHANNELS[name]
    model.train()
    assert not model.teacher.training and all(not m.training for m in model.teacher.modules())
    assert model.student.training and model.bottleneck.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.trainable_parameters()}

    x = torch.randn(2, 3, 64, 64)
    running_mean = [m.running_mean.clone() for m in model.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    teacher_feats, student_feats = model(x)
    shapes = [(2, c, 64 // s, 64 // s) for c, s in zip(EXPECTED_CHANNELS[name], (4, 8, 16))]
    assert [tuple(t.shape) for t in teacher_feats] == shapes
    assert [tuple(s.shape) for s in student_feats] == shapes
    assert all(not t.requires_grad for t in teacher_feats) and all(s.requires_grad for s in student_feats)
    after = [m.running_mean for m in model.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(running_mean, after))  # teacher BN statistics never move


def test_wide_resnet50_2_bottleneck_has_the_papers_shapes():
    model = MRKDModel("wide_resnet50_2")
    feats = [torch.zeros(1, 256, 64, 64), torch.zeros(1, 512, 32, 32), torch.zeros(1, 1024, 16, 16)]
    assert tuple(model.bottleneck(feats).shape) == (1, 2048, 8, 8)
    assert [len(stage) for stage in model.student.stages] == [3, 4, 6]
    assert model.bottleneck.stage[0].conv1.in_channels == 3072 and model.bottleneck.stage[0].conv2.out_channels == 1024


@pytest.mark.slow
def test_flm_structure_and_rd4ad_mode():
    rd4ad = MRKDModel("mobilenet_v2", flm=False)
    assert rd4ad.generation is None
    mrkd = MRKDModel("mobilenet_v2", flm=True)
    assert [block[0].in_channels for block in mrkd.generation] == [24, 32, 96]
    assert all(block[0].bias is not None and block[2].out_channels == block[0].in_channels
               for block in mrkd.generation)

    # RD4AD mode compares the decoder outputs themselves
    rd4ad.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        teacher, student = rd4ad(x)
        decoded = rd4ad.student(rd4ad.bottleneck(rd4ad.teacher(x)))
    assert all(torch.equal(a, b) for a, b in zip(student, decoded))


def capture_generation_inputs(model: MRKDModel) -> tuple[list[torch.Tensor], list]:
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().clone()))
             for block in model.generation]
    return captured, hooks


@pytest.mark.slow
def test_training_mask_is_a_side_branch_shared_by_channels():
    model = MRKDModel("mobilenet_v2", flm=True, flm_ratio=0.2).train()
    x = torch.randn(3, 3, 128, 128)
    captured, hooks = capture_generation_inputs(model)
    decoder_outputs: list[list[torch.Tensor]] = []
    model.student.register_forward_hook(lambda m, args, out: decoder_outputs.append([o.detach() for o in out]))
    _, first = model(x)
    _, second = model(x)
    for hook in hooks:
        hook.remove()
    # The decoder path does not see the mask: same input, same decoder outputs; the restored outputs differ.
    assert all(torch.equal(a, b) for a, b in zip(*decoder_outputs))
    assert not torch.equal(first[0], second[0])
    for masked, unmasked in zip(captured[:3], decoder_outputs[0]):
        zero = masked == 0
        dropped = zero.all(dim=1)  # positions zeroed in every channel
        assert torch.equal(zero.any(dim=1) & ~dropped, unmasked.eq(0).any(dim=1) & ~unmasked.eq(0).all(dim=1)
                           & ~dropped)  # partial zeros only where the decoder (ReLU) itself produced them
        kept = ~dropped
        assert torch.equal(masked * kept.unsqueeze(1), unmasked * kept.unsqueeze(1))
        hw = masked.shape[-2] * masked.shape[-1]
        expected = round(0.2 * hw)
        newly = (dropped & ~unmasked.eq(0).all(dim=1)).flatten(1).sum(1)
        assert torch.all(newly <= expected) and torch.all(newly >= expected - hw // 10)
        assert len({tuple(d.flatten().tolist()) for d in dropped}) == 3  # independent per sample


@pytest.mark.slow
def test_eval_is_deterministic_unless_inference_mask():
    x = torch.randn(2, 3, 64, 64)
    model = MRKDModel("mobilenet_v2").eval()
    with torch.no_grad():
        first, second = model(x)[1], model(x)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    model.inference_mask = True
    with torch.no_grad():
        third, fourth = model(x)[1], model(x)[1]
    assert not torch.equal(third[0], fourth[0])


@pytest.mark.slow
def test_from_config_and_target_batch():
    cfg = ModelConfig(backbone="mobilenet_v2", flm=False, flm_ratio=0.3)
    model = MRKDModel.from_config(cfg).eval()
    assert model.generation is None and model.flm_ratio == 0.3
    clean, corrupted = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        teacher_target, student = model(corrupted, clean)
        teacher_clean = model.teacher(clean)
        _, student_alone = model(corrupted)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(teacher_target, teacher_clean))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(student, student_alone))
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))


@pytest.mark.slow
def test_channels_last_gives_the_same_features():
    model = MRKDModel("efficientnet_lite0").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        other = model_cl(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(reference[0] + reference[1], other[0] + other[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # bf16 autocast (CPU here; CUDA takes the same code path), channels_last, training step
    model_cl.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        teacher_feats, student_feats = model_cl(x.contiguous(memory_format=torch.channels_last))
        loss = cosine_distillation_loss(teacher_feats, student_feats)
    loss.backward()
    assert torch.isfinite(loss) and student_feats[0].dtype == torch.bfloat16
    for t_bf16, t_fp32 in zip(teacher_feats, reference[0]):
        assert F.cosine_similarity(t_bf16.float().flatten(), t_fp32.flatten(), dim=0) > 0.99
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model_cl.trainable_parameters())


# ---------------------------------------------------------------------------------------------- weights


def test_missing_torchvision_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    # make sure no download can succeed, whatever network this machine has
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(MissingWeightsError) as info:
        MRKDModel("wide_resnet50_2", teacher=load_backbone("wide_resnet50_2"))
    message = str(info.value)
    assert "wide_resnet50_2-95faca4d.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "pass its path as weights" in message  # the parameter; mrkd.train says --weights
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        load_backbone("resnet18", weights=tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError):  # MissingWeightsError is a FileNotFoundError
        load_backbone("wide_resnet50_2")


def test_torchvision_weights_come_from_the_hub_cache_or_a_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    source = torchvision.models.resnet18(weights=None).eval()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / "resnet18-f37072fd.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.layer3(source.layer2(source.layer1(source.maxpool(source.relu(source.bn1(source.conv1(x)))))))
        from_cache = load_backbone("resnet18")(x)[2]
        torch.save(source.state_dict(), tmp_path / "mine.pth")
        from_path = load_backbone("resnet18", weights=tmp_path / "mine.pth")(x)[2]
    torch.testing.assert_close(from_cache, expected)
    torch.testing.assert_close(from_path, expected)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        load_backbone("resnet18", weights=tmp_path / "broken.pth")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LITE_TAP_BLOCKS))
def test_efficientnet_lite_weights_classify_real_photos(name):
    classifier = imagenet_classifier(name)
    x = photos(224, ("chelsea", "coffee"))
    with torch.no_grad():
        top1 = classifier(x).argmax(1).tolist()
    assert 281 <= top1[0] <= 285  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top1[1] in (504, 967, 968)  # coffee mug / espresso / cup
    # the backbone carries exactly these weights
    backbone = load_backbone(name)
    with torch.no_grad():
        blocks = classifier.block_outputs(x)
        feats = backbone(x)
    for feature, index in zip(feats, LITE_TAP_BLOCKS[name]):
        torch.testing.assert_close(feature, blocks[index])


def bn_input_mean_correlations(backbone: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Per BN layer: correlation between the channel means of its input on real photos and its running_mean."""
    means: dict[torch.nn.Module, torch.Tensor] = {}
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [bn.register_forward_pre_hook(lambda m, args: means.__setitem__(m, args[0].mean((0, 2, 3))))
             for bn in bns]
    with torch.no_grad():
        backbone(x)
    for hook in hooks:
        hook.remove()
    return [float(np.corrcoef(means[bn].numpy(), bn.running_mean.numpy())[0, 1]) for bn in bns]


@pytest.mark.parametrize("name", WITH_SHIPPED_WEIGHTS)
def test_shipped_weights_are_imagenet_features(name):
    """mobilenet_v2's file has no classifier: check that the weights fit real photos and tell photos apart.

    With the right tensors in the right places, each BatchNorm's running mean (ImageNet statistics) matches the
    channel means of its input on real photos; a wrong key mapping breaks this from the first mismatch on.
    """
    names = ("chelsea", "coffee", "astronaut", "rocket", "brick", "grass", "gravel", "immunohistochemistry")
    images = []
    for n in names:
        image = getattr(skimage.data, n)()
        s = int(min(image.shape[:2]) * 0.8)
        images += [image[:s, :s], image[-s:, -s:]]  # two overlapping crops of each photo
    x = normalize(prepare_batch(images, 128))
    backbone = load_backbone(name)
    assert np.median(bn_input_mean_correlations(backbone, x)) > 0.9
    with torch.no_grad():
        pooled = F.normalize(backbone(x)[2].mean((2, 3)), dim=1)
    similarity = pooled @ pooled.T
    similarity.fill_diagonal_(-2)
    partner = torch.arange(len(images)) ^ 1
    assert torch.equal(similarity.argmax(1), partner)  # each crop's nearest neighbour is the other crop


# ---------------------------------------------------------------------------------------------- loss


def test_loss_zero_for_identical_and_matches_formula():
    teacher = [torch.randn(4, 8, 16, 16), torch.randn(4, 16, 8, 8), torch.randn(4, 32, 4, 4)]
    assert cosine_distillation_loss(teacher, [t.clone() for t in teacher]).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distillation_loss(teacher, [2.5 * t for t in teacher]).item() == pytest.approx(0.0, abs=1e-6)
    student = [t + torch.randn_like(t) for t in teacher]
    expected = 0.0
    for t, s in zip(teacher, student):
        a, b = t.reshape(4, -1).double(), s.reshape(4, -1).double()
        expected += (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()
    loss = cosine_distillation_loss(teacher, student)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() > 0.5
    # flattened vectors, not per-pixel: the per-pixel mean differs on the same data
    per_pixel = sum((1 - F.cosine_similarity(t, s, dim=1)).mean().item() for t, s in zip(teacher, student))
    assert abs(per_pixel - loss.item()) > 1e-3
    half = cosine_distillation_loss([t.bfloat16() for t in teacher], [s.bfloat16() for s in student])
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected, rel=1e-2)
    with pytest.raises(ValueError, match="shape"):
        cosine_distillation_loss(teacher, [s[:, :, :2] for s in student])
    with pytest.raises(ValueError, match="scales"):
        cosine_distillation_loss(teacher, student[:2])


@pytest.fixture
def one_thread():
    # Tiny convolutions gain nothing from intra-op threads, and on a shared, oversubscribed 2-core machine the
    # threads' spin-waiting made this test ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_falls_when_training_on_real_solar_cells(one_thread):
    splits = open_dataset("elpv:mono")
    images = [record.load_image() for record in splits.train[:6]]
    x = normalize(prepare_batch(images, 64))
    model = MRKDModel("mobilenet_v2", teacher=load_backbone("mobilenet_v2")).train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.005, betas=(0.5, 0.999))
    losses = []
    for _ in range(20):
        teacher_feats, student_feats = model(x)
        loss = cosine_distillation_loss(teacher_feats, student_feats)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def _relu_floor(teacher_feats: list[torch.Tensor]) -> float:
    """The lowest loss a non-negative student can reach: 1 - cos(T, relu(T)) = 1 - |T+| / |T|, summed over scales."""
    return float(sum((1 - f.flatten(1).clamp(min=0).norm(dim=1) / f.flatten(1).norm(dim=1)).mean()
                     for f in teacher_feats))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_student_in_rd4ad_mode_can_reproduce_the_teachers_sign_pattern(name):
    """A short fit on one batch goes well below the loss floor that a final ReLU would impose on signed taps."""
    teacher = load_backbone(name, pretrained=name in WITH_SHIPPED_WEIGHTS)
    x = photos(64)[:2]
    with torch.no_grad():
        floor = _relu_floor(teacher(x))
    if floor == 0.0:  # post-ReLU taps (ResNets): a non-negative student output loses nothing
        assert not teacher.signed_taps
        return
    assert floor > 0.3  # MobileNetV2 / EfficientNet-Lite taps: about half of the values are negative
    model = MRKDModel(name, flm=False, teacher=teacher).train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=5e-3, betas=(0.5, 0.999))
    for _ in range(40):
        loss = cosine_distillation_loss(*model(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.6 * floor, f"loss {loss.item():.3f} vs ReLU floor {floor:.3f}"


def test_generation_blocks_use_kaiming_normal_fan_out_like_the_reference():
    model = MRKDModel("mobilenet_v2", flm=True)
    for block in model.generation:
        for conv in (block[0], block[2]):
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            expected = (2.0 / fan_out) ** 0.5  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
            assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
