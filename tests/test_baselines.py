"""The plain baselines, against which RoB is compared, guarded as the RoB losses are: one training step of each
baseline (through build_run and train_step, as training runs them) against an independent float64 computation of
its targets, loss, clipped gradients, EMA teacher, centres and frozen or learned pieces; and the multi-crop
augmentation as built, sampled: crop sizes, areas and aspect ratios, and each view's colour, blur and solarisation
rates."""
import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import rob_dino
import rob_ibot
import rob_msn
import rob_swav

B = 4  # images per batch


def tiny_run(module, flags, iters_per_epoch=2):
    """A plain-baseline run of `module` on a test ViT, as main() builds it, with synthetic data."""
    args = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(
        ["--data_path", "synthetic", "--student", "test_vit", "--patch_size", "8", "--global_crops_size", "16",
         "--local_crops_size", "8", "--local_crops_number", "2", "--drop_path_rate", "0", "--batch_size_per_gpu",
         str(B), "--epochs", "4", "--warmup_epochs", "1", *flags])
    module.check_args(args)
    data = common.training_data("synthetic", module.build_augmentation(args), B, 0, subset=B * iters_per_epoch)
    torch.manual_seed(0)
    student, arch = module.build_student(args, None)
    return module.build_run(args, torch.device("cpu"), data, student, arch, None)


def crops(seed=0, n_local=2):
    generator = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, 3, 16, 16, generator=generator) for _ in range(2)]
            + [torch.randn(B, 3, 8, 8, generator=generator) for _ in range(n_local)])


def cross_entropy(targets, log_probs):
    """Batch mean of -sum_k targets * log_probs, float64."""
    return -(targets * log_probs).sum(-1).mean()


def cosine(base, final, step, total):
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * step / total))


def frozen_copy(module):
    """The network before the step: its forward as training runs it (fp32); the loss is then computed in float64."""
    return copy.deepcopy(module)


def trained(network):
    return [(name, p) for name, p in network.named_parameters() if p.requires_grad]


def clipped_grads(loss, params, max_norm):
    """Gradients of `loss`, each tensor scaled down to a norm of at most max_norm (DINO's clipping)."""
    return [g.double() * min(1.0, max_norm / (g.norm().item() + 1e-6)) for g in torch.autograd.grad(loss, params)]


def assert_grads(run_params, expected, names):
    """The run's gradients (left on the parameters by the step) equal the expected ones; not vacuous."""
    for name, p, g in zip(names, run_params, expected):
        torch.testing.assert_close(p.grad.double(), g, rtol=2e-3, atol=1e-9, msg=lambda m: f"{name}: {m}")
    assert len(names) > 10 and max(g.abs().max().item() for g in expected) > 0


def assert_ema(teacher_after, teacher_before, student_after, m):
    """teacher <- m * teacher + (1 - m) * student, tensor by tensor; not vacuous: the student moved."""
    moved, student = 0.0, dict(student_after.named_parameters())
    for (name, t1), t0 in zip(teacher_after.named_parameters(), teacher_before.parameters()):
        s1, t0 = student[name].double(), t0.double()
        torch.testing.assert_close(t1.double(), m * t0 + (1 - m) * s1, rtol=0, atol=1e-6,
                                   msg=lambda msg: f"EMA of {name}: {msg}")
        moved = max(moved, (s1 - t0).abs().max().item())
    assert moved > 1e-4


# --------------------------------------------------------------------------------------------------- DINO
DINO = ["--teacher", "ema", "--out_dim", "32", "--hidden_dim", "16", "--bottleneck_dim", "8", "--momentum_teacher",
        "0.9", "--center_momentum", "0.8", "--warmup_teacher_temp_epochs", "3", "--clip_grad", "0.01"]


def test_plain_dino_step_equals_a_float64_step():
    """Step 3 (epoch 1 of 4, 2 steps each): targets softmax((teacher - centre) / T) with T warmed up from 0.04 to
    0.07 over 3 epochs, cross-view pairs, CE at 0.1; each gradient tensor clipped to 0.01; then teacher <- m teacher +
    (1 - m) student with m cosine from 0.9 to 1, centre <- 0.8 centre + 0.2 batch mean of the teacher's logits."""
    run, step = tiny_run(rob_dino, DINO), 3
    with torch.no_grad():
        run.plain.center.center.normal_()  # a centre of its own: subtracting it must show
    batch = crops()
    student, teacher, center = frozen_copy(run.student), frozen_copy(run.plain.teacher), \
        run.plain.center.center.double().clone()
    loss = rob_dino.train_step(run, batch, None, step)["train_loss"]

    teacher_logits = teacher(batch[:2]).detach().double()  # [2B, K]
    temp = 0.04 + (0.07 - 0.04) * 1 / 3
    targets = F.softmax((teacher_logits - center) / temp, -1).chunk(2)
    log_probs = F.log_softmax(student(batch).double() / 0.1, -1).chunk(4)
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
    expected = sum(cross_entropy(targets[t], log_probs[s]) for t, s in pairs) / len(pairs)
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()
    names, params = zip(*trained(student))
    assert_grads([p for _, p in trained(run.student)], clipped_grads(expected, params, 0.01), names)
    m = cosine(0.9, 1.0, step, 8)
    assert_ema(run.plain.teacher, teacher, run.student, m)
    torch.testing.assert_close(run.plain.center.center.double(), 0.8 * center + 0.2 * teacher_logits.mean(0, True),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("module", [rob_dino, rob_ibot], ids=lambda m: m.__name__)
def test_plain_dino_and_ibot_freeze_their_last_layers_for_the_first_epoch(module):
    run = tiny_run(module, DINO if module is rob_dino else IBOT)
    masks = torch.zeros(B, 2, 2, 2, dtype=torch.bool)
    masks[:, :, 0] = True
    batch = (lambda seed: crops(seed)) if module is rob_dino else (lambda seed: (crops(seed), masks))
    last = run.student.head.last_layer.parametrizations.weight  # iBOT's shared one is also its last_layer2
    before = last.original1.detach().clone()
    module.train_step(run, batch(0), None, 1)  # epoch 0: frozen
    assert last.original1.grad is None and torch.equal(last.original1, before)
    assert not last.original0.requires_grad  # norm_last_layer: g stays 1
    module.train_step(run, batch(1), None, 2)  # epoch 1: trained
    assert last.original1.grad is not None and not torch.equal(last.original1, before)


# --------------------------------------------------------------------------------------------------- iBOT
IBOT = ["--teacher", "ema", "--out_dim", "32", "--patch_out_dim", "32", "--hidden_dim", "16", "--bottleneck_dim", "8",
        "--momentum_teacher", "0.9", "--center_momentum", "0.8", "--warmup_teacher_temp_epochs", "3",
        "--warmup_teacher_patch_temp", "0.02", "--teacher_patch_temp", "0.05", "--clip_grad", "0.01",
        "--lambda1", "0.7", "--lambda2", "1.3"]


def test_plain_ibot_step_equals_a_float64_step():
    """Step 3: CLS term as DINO's; patch term: per global crop, the mean over its masked patches of CE against
    softmax((teacher patch logits of the same view - patch centre) / T_patch), T_patch warmed up from 0.02 to 0.05,
    averaged over all crops; lambda1 CLS + lambda2 patch; clipping, EMA (no mask token), both centres (the patch
    centre from every patch of the unmasked views)."""
    run, step = tiny_run(rob_ibot, IBOT), 3
    with torch.no_grad():
        run.plain.center.center.normal_()
        run.plain.patch_center.center.normal_()
    masks = torch.zeros(B, 2, 2, 2, dtype=torch.bool)  # loader layout [B, view, h, w]
    masks[0, 0, 0, :] = masks[1, 1, :, 1] = masks[3, 0] = True  # image 2 unmasked: adds 0 but counts
    batch = crops()
    student, teacher = frozen_copy(run.student), frozen_copy(run.plain.teacher)
    center, patch_center = run.plain.center.center.double().clone(), run.plain.patch_center.center.double().clone()
    terms = rob_ibot.train_step(run, (batch, masks), None, step)

    views = masks.transpose(0, 1).flatten(0, 1)  # [2B, h, w], crop-major
    index = views.flatten().nonzero()[:, 0]
    teacher_cls, teacher_patch = (t.detach().double() for t in teacher(batch[:2]))  # every patch
    student_cls, student_patch = (t.double() for t in student(batch, masks=views, patch_index=index))
    cls_targets = F.softmax((teacher_cls - center) / (0.04 + 0.03 / 3), -1).chunk(2)
    cls_log_probs = F.log_softmax(student_cls / 0.1, -1).chunk(4)
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
    cls_term = sum(cross_entropy(cls_targets[t], cls_log_probs[s]) for t, s in pairs) / len(pairs)
    patch_targets = F.softmax((teacher_patch[index] - patch_center) / (0.02 + 0.03 / 3), -1)
    per_patch = -(patch_targets * F.log_softmax(student_patch / 0.1, -1)).sum(-1)
    owner = index // 4  # the crop each masked patch belongs to (4 patches per crop)
    patch_term = sum(per_patch[owner == crop].mean() for crop in owner.unique()) / (2 * B)
    expected = 0.7 * cls_term + 1.3 * patch_term
    for name, value in (("train_cls", cls_term), ("train_patch", patch_term), ("train_loss", expected)):
        assert abs(terms[name].item() - value.item()) < 1e-5 * value.item(), name
    names, params = zip(*trained(student))
    assert_grads([p for _, p in trained(run.student)], clipped_grads(expected, params, 0.01), names)
    assert_ema(run.plain.teacher, teacher, run.student, cosine(0.9, 1.0, step, 8))
    torch.testing.assert_close(run.plain.center.center.double(), 0.8 * center + 0.2 * teacher_cls.mean(0, True),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(run.plain.patch_center.center.double(),
                               0.8 * patch_center + 0.2 * teacher_patch.mean(0, True), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- MSN
MSN = ["--teacher", "ema", "--out_dim", "16", "--hidden_dim", "16", "--bottleneck_dim", "8", "--patch_drop", "0",
       "--momentum_teacher", "0.9", "--memax_weight", "0.5", "--clip_grad", "0.05"]


def msn_sinkhorn(probs, iterations):
    """MSN's Sinkhorn, as its code writes it: Q = probs^T / sum, then per row / K, per column / B, times B."""
    q = probs.t() / probs.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / b
    return (q * b).t()


def test_plain_msn_step_equals_a_float64_step():
    """The target encoder (an EMA, momentum linear from 0.9 to 1 over 1.25x the run) sees global crop 0, the student
    global crop 1 and the locals; scores are cosines to the learned prototypes; targets softmax(cos / 0.025) balanced
    by 3 Sinkhorn steps; loss CE at 0.1 + 0.5 me-max (sum p log p + log K of the mean prediction); the gradient norm
    of every tensor but the prototypes clipped to 0.05 together."""
    run, step = tiny_run(rob_msn, MSN), 3
    batch = crops()
    student, teacher = frozen_copy(run.student), frozen_copy(run.plain.teacher)
    terms = rob_msn.train_step(run, batch, None, step)

    prototypes = F.normalize(student.prototypes.double(), dim=-1)
    target_scores = F.normalize(teacher(batch[:1]).double(), dim=-1) @ prototypes.t()
    targets = msn_sinkhorn(F.softmax(target_scores / 0.025, -1), 3).detach()
    scores = F.normalize(student(batch[1:]).double(), dim=-1) @ prototypes.t()  # [3B, K]
    average = F.softmax(scores / 0.1, -1).mean(0)
    me_max = (average * average.log()).sum() + math.log(16)
    log_probs = F.log_softmax(scores / 0.1, -1).chunk(3)
    expected = sum(cross_entropy(targets, lp) for lp in log_probs) / 3 + 0.5 * me_max
    assert abs(terms["train_loss"].item() - expected.item()) < 1e-5 * abs(expected.item())
    assert abs(terms["me_max"].item() - me_max.item()) < 1e-6 + 1e-5 * abs(me_max.item())
    names, params = zip(*trained(student))
    grads = [g.double() for g in torch.autograd.grad(expected, params)]
    clipped = [n for n in names if n != "prototypes"]
    norm = torch.sqrt(sum(g.norm() ** 2 for n, g in zip(names, grads) if n in clipped)).item()
    assert norm > 0.05  # not vacuous: the clipping acts
    scaled = [g * (0.05 / (norm + 1e-6) if n in clipped else 1.0) for n, g in zip(names, grads)]
    assert_grads([p for _, p in trained(run.student)], scaled, names)
    total = 4 * 2
    m = 0.9 + (1 - 0.9) * step / int(1.25 * total)
    assert_ema(run.plain.teacher, teacher, run.student, m)


# --------------------------------------------------------------------------------------------------- SwAV
SWAV = ["--teacher", "self", "--nmb_prototypes", "12", "--feat_dim", "8", "--hidden_mlp", "16", "--optimizer",
        "adamw"]


def swav_sinkhorn(scores, epsilon, iterations):
    """SwAV's Sinkhorn, as its code writes it: Q = exp(scores / eps)^T / sum; per row / K, per column / B; times B."""
    q = torch.exp(scores / epsilon).t()
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / b
    return (q * b).t()


def test_plain_swav_step_equals_a_float64_step():
    """Codes from the student's own scores of each global crop (Sinkhorn at epsilon 0.05, 3 steps, no gradient),
    swapped prediction by every other crop at temperature 0.1; prototypes frozen for the first epoch, then learned
    and renormalised to the unit sphere after each step."""
    run = tiny_run(rob_swav, SWAV)
    assert run.freeze_prototypes == run.iters_per_epoch == 2 and run.epsilon == 0.05
    for step in (1, 2):  # the last frozen step, then the first learned one
        batch = crops(step)
        student = frozen_copy(run.student)
        prototypes_before = run.student.head.prototypes.weight.detach().clone()
        loss = rob_swav.train_step(run, batch, None, step)["train_loss"]
        scores = student(batch)[1].double()
        codes = [swav_sinkhorn(view.detach(), 0.05, 3) for view in scores[:2 * B].chunk(2)]
        log_probs = F.log_softmax(scores / 0.1, -1).chunk(4)
        pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
        expected = sum(cross_entropy(codes[t], log_probs[s]) for t, s in pairs) / len(pairs)
        assert abs(loss.item() - expected.item()) < 1e-5 * expected.item(), step
        prototypes = run.student.head.prototypes.weight
        torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(12), rtol=0, atol=1e-6)
        if step < 2:  # frozen: no gradient, no step (renormalised only)
            assert prototypes.grad is None
            torch.testing.assert_close(prototypes, prototypes_before, rtol=0, atol=1e-6)
        else:
            assert (prototypes - prototypes_before).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------- augmentation
def position_image(size=96):
    """An RGB image whose pixels encode their own column (red) and row (green)."""
    ramp = torch.arange(size, dtype=torch.float32) * 255 / (size - 1)
    return Image.fromarray(torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size),
                                        torch.full((size, size), 128.0)], -1).round().byte().numpy())


SCALES = ["--global_crops_size", "32", "--local_crops_size", "16", "--global_crops_scale", "0.5", "1",
          "--local_crops_scale", "0.05", "0.2", "--local_crops_number", "3"]


@pytest.mark.parametrize("module", [rob_dino, rob_ibot, rob_msn, rob_swav], ids=lambda m: m.__name__)
def test_every_crop_as_built_has_the_flags_sizes_areas_and_ratios(module, monkeypatch):
    """Many crops of each view through the per-image path and the batched path: the boxes drawn by the transforms
    actually applied fall within each crop kind's area range (global 0.5-1, local 0.05-0.2) and the 3/4-4/3 aspect
    ratios, cover those ranges, and the crops have their kind's size."""
    args = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(["--data_path", "synthetic", *SCALES])
    module.check_args(args)
    aug = module.build_augmentation(args)
    drawn = []
    make_params = type(aug.local_transform.transforms[0]).make_params

    def spy(self, flat_inputs):
        params = make_params(self, flat_inputs)
        drawn.append((self.size[0], params["height"] * params["width"] / 96 ** 2, params["width"] / params["height"]))
        return params
    monkeypatch.setattr(type(aug.local_transform.transforms[0]), "make_params", spy)
    image = position_image()
    for _ in range(150):
        views = aug(image)
        assert [v.shape[-1] for v in views] == [32, 32, 16, 16, 16]
    boxes_drawn = []
    real_boxes = common.random_resized_crop_boxes

    def spy_boxes(sizes, scale, generator=None, **kwargs):
        boxes = real_boxes(sizes, scale, generator, **kwargs)
        boxes_drawn.append((boxes, sizes))
        return boxes
    monkeypatch.setattr(common, "random_resized_crop_boxes", spy_boxes)
    batch = aug.batch(torch.randint(0, 256, (100, 3, 96, 96), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert [c.shape for c in batch] == [(100, 3, 32, 32)] * 2 + [(100, 3, 16, 16)] * 3
    for (boxes, sizes), size in zip(boxes_drawn, (32, 16)):
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        drawn += [(size, a, r) for a, r in zip((w * h / sizes.prod(1)).tolist(), (w / h).tolist())]
    for size, (low, high) in ((32, (0.5, 1.0)), (16, (0.05, 0.2))):
        areas = torch.tensor([a for s, a, _ in drawn if s == size])
        ratios = torch.tensor([r for s, _, r in drawn if s == size])
        assert len(areas) > 400
        assert areas.min() >= low * 0.9 and areas.max() <= high * 1.1, (size, areas.min(), areas.max())  # rounding
        assert areas.min() < low + 0.15 * (high - low) and areas.max() > high - 0.15 * (high - low)  # spans the range
        assert ratios.min() >= 0.7 and ratios.max() <= 1.4, (size, ratios.min(), ratios.max())


RATES = {  # method: (colour jitter p, grayscale p, blur p per kind, solarise p per kind) of its recipe
    rob_dino: (0.8, 0.2, (1.0, 0.1, 0.5), (0.0, 0.2, 0.0)), rob_ibot: (0.8, 0.2, (1.0, 0.1, 0.5), (0.0, 0.2, 0.0)),
    rob_msn: (0.8, 0.2, (0.5, 0.5, 0.5), (0.0, 0.0, 0.0)), rob_swav: (0.8, 0.2, (0.5, 0.5, 0.5), (0.0, 0.0, 0.0))}


@pytest.mark.parametrize("module", list(RATES), ids=lambda m: m.__name__)
def test_each_view_is_jittered_blurred_and_solarised_at_its_recipes_rate(module, monkeypatch):
    """The per-image path, counted: colour jitter, grayscale, blur and solarise applied to each view (first global,
    second global, locals) at the recipe's rates (within 4 binomial standard deviations of 600 draws)."""
    args = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(["--data_path", "synthetic", *SCALES])
    module.check_args(args)
    aug = module.build_augmentation(args)
    counts, current = {}, [None]

    def counting(cls, name):
        real = getattr(cls, name)

        def wrapper(self, *a, **kw):
            counts[(current[0], cls.__name__)] = counts.get((current[0], cls.__name__), 0) + 1
            return real(self, *a, **kw)
        monkeypatch.setattr(cls, name, wrapper)
    counting(common.T.ColorJitter, "transform")
    counting(common.T.RandomGrayscale, "transform")
    counting(common.T.RandomSolarize, "transform")
    real_blur = common.RandomGaussianBlur.__call__

    def blur(self, img):
        out = real_blur(self, img)
        if out is not img:
            counts[(current[0], "blur")] = counts.get((current[0], "blur"), 0) + 1
        return out
    monkeypatch.setattr(common.RandomGaussianBlur, "__call__", blur)
    image, n = position_image(48), 600
    for _ in range(n):
        for kind, transform in enumerate([*aug.global_transforms, aug.local_transform]):
            current[0] = kind
            transform(image)
    jitter, gray, blur_p, solarize_p = RATES[module]
    for kind in range(3):
        for name, p in (("ColorJitter", jitter), ("RandomGrayscale", gray), ("blur", blur_p[kind]),
                        ("RandomSolarize", solarize_p[kind])):
            rate, tolerance = counts.get((kind, name), 0) / n, 4 * math.sqrt(max(p * (1 - p), 1e-4) / n)
            assert abs(rate - p) <= tolerance, (module.__name__, kind, name, rate, p)
