"""Every default that ../shared/RECIPE.md states, pinned: a change that drifts from the reference recipe fails here.
Flags are read from each script's parser; what the scripts derive from them (augmentation, heads, drop-path,
clipping, schedules, optimiser, pairing) from the objects they build, with the official tiny teachers."""
import argparse
import math

import pytest
import torch
import torch.nn as nn

import common
import rob_dino
import rob_ibot
import rob_msn
import rob_swav
from conftest import OFFICIAL_TINY

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def defaults(module, *args):
    parsed = argparse.ArgumentParser(parents=[module.get_args_parser()]).parse_args(
        ["--data_path", "synthetic", *map(str, args)])
    module.check_args(parsed)
    return parsed


def assert_augmentation(aug, global_scale, n_local, local_scale, jitter, blur, solarize, interpolation, std=IMAGENET["std"]):
    assert (aug.global_crops_size, aug.local_crops_size, aug.global_crops_number) == (224, 96, 2)
    assert tuple(aug.global_crops_scale) == global_scale and tuple(aug.local_crops_scale) == local_scale
    assert aug.local_crops_number == n_local
    assert tuple(aug.color_jitter) == jitter and aug.color_jitter_p == 0.8 and aug.grayscale_p == 0.2
    assert tuple(aug.blur_p) == blur and tuple(aug.solarize_p) == solarize  # (global 1, global 2, locals)
    assert aug.interpolation == interpolation and tuple(aug.mean) == IMAGENET["mean"] and tuple(aug.std) == std


def assert_adamw_schedules(run, lr_per_256, warmup_epochs, min_lr, wd=(0.04, 0.4), warmup_start=0.0):
    """AdamW without weight decay on biases and norms; lr = lr_per_256 x global batch / 256 after a linear
    warm-up, cosine to min_lr; weight decay cosine from wd[0] to wd[1]; per-iteration values."""
    ipe, lr = run.iters_per_epoch, run.lr_schedule
    peak = lr_per_256 * run.global_batch / 256
    assert isinstance(run.optimizer, torch.optim.AdamW)
    assert all(p.ndim <= 1 for p in run.optimizer.param_groups[1]["params"]) and run.optimizer.param_groups[1]["weight_decay"] == 0
    assert all(p.ndim > 1 for p in run.optimizer.param_groups[0]["params"])
    assert lr[0] == pytest.approx(warmup_start) and max(lr) == pytest.approx(peak)
    assert lr[warmup_epochs * ipe] == pytest.approx(peak) and lr[warmup_epochs * ipe - 1] < peak
    assert lr[-1] == pytest.approx(min_lr, abs=peak * 1e-3)
    assert run.wd_schedule[0] == pytest.approx(wd[0]) and run.wd_schedule[-1] == pytest.approx(wd[1], abs=1e-3)


def build(module, args, teacher, iters_per_epoch=20):
    data = common.training_data("synthetic", module.build_augmentation(args), args.batch_size_per_gpu, 0,
                                subset=args.batch_size_per_gpu * iters_per_epoch)
    student, arch = module.build_student(args, teacher)
    return module.build_run(args, torch.device("cpu"), data, student, arch, teacher), student


# ---------------------------------------------------------------------------------------------- RoB-DINO
def test_rob_dino_defaults():
    args = defaults(rob_dino)
    assert args.teacher == "dino_vitb16" and args.student == "vit_tiny"
    assert (args.teacher_temp, args.student_temp, args.swapped) == (0.07, 0.1, False)
    assert (args.epochs, args.lr, args.min_lr, args.warmup_epochs) == (300, 5e-4, 1e-5, 10)
    assert (args.weight_decay, args.weight_decay_end) == (0.04, 0.4)
    assert (args.hidden_dim, args.bottleneck_dim, args.out_dim) == (2048, 256, 65536)
    assert_augmentation(rob_dino.build_augmentation(args), (0.25, 1.0), 8, (0.05, 0.25), (0.4, 0.4, 0.4, 0.1),
                        (1.0, 0.1, 0.5), (0.0, 0.2, 0.0), "bicubic")
    # plain DINO: EMA 0.996 -> 1, centre 0.9, teacher temperature 0.04 -> 0.07 over 30 epochs, last layer frozen 1
    assert (args.momentum_teacher, args.center_momentum, args.warmup_teacher_temp) == (0.996, 0.9, 0.04)
    assert (args.warmup_teacher_temp_epochs, args.freeze_last_layer) == (30, 1)
    teacher = rob_dino.load_teacher(str(OFFICIAL_TINY / "dino_tiny_full_checkpoint.pth"))
    run, student = build(rob_dino, defaults(rob_dino, "--global_crops_size", 32), teacher)
    assert student.head.last_layer.out_features == teacher.head.last_layer.out_features  # the teacher's K
    assert student.head.mlp[0].out_features == 2048 and student.head.last_layer.in_features == 256  # the flags'
    assert student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # ViT: 0.1 (stochastic depth)
    assert args.clip_grad is None and run.plain is None  # RoB: no clipping, no EMA, no centre
    assert run.partners.tolist() == [[1, 0] + [1] * 8, [0, 1] + [1] * 8]  # same-view pairing, cross pair skipped
    assert_adamw_schedules(run, 5e-4, 10, 1e-5)
    assert rob_dino.teacher_probs(torch.tensor([[0.07, 0.0]]), args.teacher_temp).tolist()[0] == \
        pytest.approx(torch.softmax(torch.tensor([1.0, 0.0]), 0).tolist())  # softmax(logits / 0.07), no centre
    _, arch = rob_dino.build_student(defaults(rob_dino, "--student", "resnet18"), teacher)
    assert arch["kwargs"]["drop_path_rate"] == 0.0  # convnets: no drop-path
    plain, _ = build(rob_dino, defaults(rob_dino, "--teacher", "ema", "--out_dim", 64, "--global_crops_size", 32), None)
    assert plain.plain.momentum[0] == 0.996 and plain.plain.temps[0] == 0.04 and plain.plain.temps[30] == 0.07
    assert plain.partners.tolist()[0][:2] == [0, 1]  # the baseline pairs across views


def test_plain_dino_clips_each_gradient_tensor_at_3():
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    params[0].grad, params[1].grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4])
    rob_dino.clip_gradients_per_tensor(params, 3.0)
    assert params[0].grad.norm().item() == pytest.approx(3.0, rel=1e-5) and params[1].grad.tolist() == pytest.approx([0.3, 0.4])


# ---------------------------------------------------------------------------------------------- RoB-iBOT
def test_rob_ibot_defaults():
    args = defaults(rob_ibot)
    assert args.teacher == "ibot_vitb16"
    assert (args.teacher_temp, args.teacher_patch_temp, args.student_temp) == (0.07, 0.07, 0.1)
    assert (args.lambda1, args.lambda2, args.mask_prob, tuple(args.mask_ratio)) == (1.0, 1.0, 0.5, (0.1, 0.5))
    assert (args.epochs, args.lr, args.warmup_epochs, args.weight_decay, args.weight_decay_end) == (100, 5e-4, 10, 0.04, 0.48)
    assert args.shared_head and (args.hidden_dim, args.bottleneck_dim) == (2048, 256)
    assert_augmentation(rob_ibot.build_augmentation(args), (0.25, 1.0), 10, (0.05, 0.25), (0.4, 0.4, 0.4, 0.1),
                        (1.0, 0.1, 0.5), (0.0, 0.2, 0.0), "bicubic")
    masks = rob_ibot.BlockMaskGenerator((14, 14))
    assert (masks.p, masks.ratio, masks.min_area) == (0.5, (0.1, 0.5), 16)
    assert masks.log_aspect == pytest.approx((math.log(0.3), math.log(1 / 0.3)))
    teacher = rob_ibot.load_teacher(str(OFFICIAL_TINY / "ibot_tiny_checkpoint.pth"))
    run, student = build(rob_ibot, defaults(rob_ibot, "--global_crops_size", 64), teacher)
    assert student.head.last_layer is student.head.last_layer2  # one shared last layer for CLS and patches
    assert isinstance(student.backbone.blocks[-1].drop_path1, nn.Identity)  # ViT-Tiny: drop-path 0
    small, _ = rob_ibot.build_student(defaults(rob_ibot, "--student", "vit_small", "--global_crops_size", 64), teacher)
    assert small.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # ViT-S: 0.1
    assert args.clip_grad is None and run.plain is None and run.pairs == rob_ibot.view_pairs(2, 12)
    assert_adamw_schedules(run, 5e-4, 10, 1e-5, wd=(0.04, 0.48))
    plain, student = build(rob_ibot, defaults(rob_ibot, "--teacher", "ema", "--out_dim", 64, "--patch_out_dim", 64,
                                              "--global_crops_size", 64), None)
    assert student.head.last_layer is student.head.last_layer2  # the plain baseline shares it too (iBOT's recipe)
    assert plain.plain.cls_temps[0] == plain.plain.patch_temps[0] == 0.04


# ----------------------------------------------------------------------------------------------- RoB-MSN
def test_rob_msn_defaults(tmp_path):
    args = defaults(rob_msn)
    assert args.teacher == "msn_vitl16" and (args.teacher_temp, args.student_temp) == (0.025, 0.1)
    assert (args.epochs, args.lr, args.start_lr, args.min_lr, args.warmup_epochs) == (150, 2.5e-4, 5e-5, 1e-5, 15)
    assert (args.weight_decay, args.weight_decay_end, args.clip_grad, args.drop_path_rate) == (0.04, 0.4, 1.0, 0.0)
    assert_augmentation(rob_msn.build_augmentation(args), (0.3, 1.0), 10, (0.05, 0.3), (0.8, 0.8, 0.8, 0.2),
                        (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), "bilinear")
    # plain MSN: EMA from 0.996, me-max weight 1, Sinkhorn 3 iterations, 1024 prototypes
    assert (args.momentum_teacher, args.memax_weight, args.sinkhorn_iterations, args.out_dim) == (0.996, 1.0, 3, 1024)
    teacher = rob_msn.teacher_from_checkpoint(common.load_file(OFFICIAL_TINY / "msn_tiny.pth.tar"), "tiny", num_heads=3)
    run, student = build(rob_msn, defaults(rob_msn, "--global_crops_size", 32), teacher)
    linears = [m for m in student.head if isinstance(m, nn.Linear)]
    assert [type(m) for m in student.head] == [nn.Linear, nn.Identity, nn.Linear]  # Linear -> Linear, no activation
    assert linears[0].out_features == 2048 and linears[1].out_features == len(teacher.prototypes)  # hidden: the flag's
    assert student.patch_drop == 0.10  # ViT-Tiny drops 10 % of its global-crop tokens
    assert rob_msn.build_student(defaults(rob_msn, "--student", "vit_small"), teacher)[0].patch_drop == 0.15
    convnet, _ = rob_msn.build_student(defaults(rob_msn, "--student", "resnet18"), teacher)
    assert [type(m) for m in convnet.head] == [nn.Linear, nn.BatchNorm1d, nn.Linear] and convnet.patch_drop == 0
    assert run.pairs == rob_ibot.view_pairs(2, 12) and run.target_temp == 0.025
    assert_adamw_schedules(run, 2.5e-4, 15, 1e-5, warmup_start=5e-5 * run.global_batch / 256)


# ---------------------------------------------------------------------------------------------- RoB-SwAV
def test_rob_swav_defaults():
    args = defaults(rob_swav)
    assert args.teacher == "swav_rn50" and args.student == "resnet18" and args.optimizer == "lars"
    assert (args.epsilon, args.sinkhorn_iterations, args.student_temp, args.teacher_crops) == (None, 3, 0.1, 1)
    assert (args.epochs, args.lr, args.weight_decay, args.weight_decay_end, args.warmup_epochs) == (100, 0.3, 1e-6, 1e-6, 10)
    assert (args.hidden_mlp, args.clip_grad, args.freeze_prototypes_niters, args.queue_length) == (2048, 0.0, None, 0)
    assert_augmentation(rob_swav.build_augmentation(args), (0.14, 1.0), 4, (0.05, 0.14), (0.8, 0.8, 0.8, 0.2),
                        (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), "bilinear", std=(0.228, 0.224, 0.225))
    teacher = rob_swav.load_teacher(str(OFFICIAL_TINY / "swav_tiny_rn_1111.pth.tar"))
    run, student = build(rob_swav, defaults(rob_swav, "--global_crops_size", 32), teacher)
    assert run.epsilon == 0.03 and run.freeze_prototypes == 0  # RoB: eps 0.03, own prototypes never frozen
    assert student.head.prototypes.weight.shape == teacher.head.prototypes.weight.shape and student.head.prototypes.weight.requires_grad
    assert student.head.projection_head[0].out_features == 2048 and isinstance(student.head.projection_head[1], nn.BatchNorm1d)
    assert run.pairs == [(0, s) for s in range(6)]  # one teacher crop: every student crop predicts its code
    peak = 0.3 * run.global_batch / 256  # LARS: warm-up from peak / 16, cosine to peak / 1000, weight decay 1e-6
    assert isinstance(run.optimizer, rob_swav.LARS) and run.optimizer.defaults["trust_coefficient"] == 0.001
    assert run.lr_schedule[0] == pytest.approx(peak / 16) and max(run.lr_schedule) == pytest.approx(peak)
    assert run.lr_schedule[-1] == pytest.approx(peak / 1000, rel=1e-2) and set(run.wd_schedule) == {1e-6}
    plain, _ = build(rob_swav, defaults(rob_swav, "--teacher", "self", "--nmb_prototypes", 30), None)
    assert plain.epsilon == 0.05 and plain.freeze_prototypes == plain.iters_per_epoch  # frozen for the first epoch


# ------------------------------------------------------------------------------------------ shared rules
def test_shared_student_rules():
    resnet, dim, _ = common.student_backbone("resnet18")  # torchvision's init: no zero-initialised last BN
    assert all(block.bn2.weight.eq(1).all() for block in resnet.layer4)
    _, dim, _ = common.student_backbone("mobilenet_v3")
    assert dim == 960  # the pooled features, as the reference's mobilenetv3_tv
    assert rob_ibot.view_pairs(2, 4) == [(0, 0), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]  # same-view by default
    args = defaults(rob_dino)
    assert args.precision is None and not args.compile and args.saveckp_freq == 20
    assert rob_dino.RESUMABLE_FLAGS >= {"output_dir", "data_path", "num_workers", "epochs"}
