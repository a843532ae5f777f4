"""eval_linear.py: k-NN / linear / low-shot against known Fashion-MNIST pixel baselines and a brute-force k-NN,
backbone loading from every checkpoint kind (official tiny fixtures, rob_*.py, student_timm.pth), clear errors,
2-process extraction = 1-process, and end-to-end CLI runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import eval_linear
from conftest import OFFICIAL_TINY, run_script


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as run_script's OMP_NUM_THREADS=1: on a shared 2-core machine the probes' many small ops
    run up to 20x slower with two threads contending (measured: 7 s vs 158 s), large matmuls no faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pixels():
    """Fashion-MNIST as an identity "backbone" sees it: flattened raw pixels in [0, 1] (784-d), train and test."""
    (train, train_labels), (test, test_labels) = common.load_fashion_mnist(True), common.load_fashion_mnist(False)
    return train.flatten(1).float() / 255, train_labels, test.flatten(1).float() / 255, test_labels


@pytest.fixture(scope="module")
def image_folder(fashion_mnist_folder, tmp_path_factory):
    """An ImageFolder data root with train/ and val/ (both the 80 conftest Fashion-MNIST images)."""
    root = tmp_path_factory.mktemp("folder_root")
    for split in ("train", "val"):
        (root / split).symlink_to(fashion_mnist_folder, target_is_directory=True)
    return root


# ------------------------------------------------------------------------------------ known pixel baselines
def test_knn_on_pixels_gives_the_known_baseline(pixels):
    knn = eval_linear.knn_classifier(*pixels, ks=[20], temperature=0.07, num_classes=10)
    assert abs(knn[20][0] - 84.6) <= 0.3, knn  # cosine k-NN on raw pixels, measured independently: 84.6 %


def test_linear_probe_on_pixels_gives_the_logistic_regression_baseline(pixels):
    train, train_labels, test, test_labels = pixels
    result = eval_linear.linear_probe(train, train_labels, test, test_labels, 10, eval_linear.FAST_LRS, epochs=10)
    assert abs(result["top1"] - 84.0) <= 2.0, result  # Fashion-MNIST's published logistic-regression baseline
    assert result["holdout_top1"] == max(result["holdout_top1_per_lr"].values())


def test_linear_probe_depends_on_its_seed_not_on_the_global_rng():
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(600, 8, generator=gen), torch.randn(100, 8, generator=gen)
    train_labels, test_labels = (x[:, :3].argmax(1) for x in (train, test))

    def probe(global_seed, seed):
        torch.manual_seed(global_seed)  # whatever ran before (a model built, an augmentation) left the RNG here
        return eval_linear.linear_probe(train, train_labels, test, test_labels, 3, [1e-3, 1e-2], epochs=1, seed=seed)
    assert probe(0, seed=0) == probe(123, seed=0)
    assert probe(0, seed=0)["holdout_top1_per_lr"] != probe(0, seed=1)["holdout_top1_per_lr"]


def test_knn_equals_brute_force_float64():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 16, generator=gen)
    train_labels, test_labels = torch.randint(0, 10, (300,), generator=gen), torch.randint(0, 10, (70,), generator=gen)
    train = centres[train_labels] + 1.5 * torch.randn(300, 16, generator=gen)
    test = centres[test_labels] + 1.5 * torch.randn(70, 16, generator=gen)
    for temperature in (0.07, 0.5):
        result = eval_linear.knn_classifier(train, train_labels, test, test_labels, [1, 5, 20, 50], temperature, 10,
                                            chunk=32)
        for k, (top1, top5) in result.items():
            hits1 = hits5 = 0
            fewest_voted_classes = 10
            for i in range(len(test)):  # explicit float64 loop over test images and neighbours
                sims = [float(F.cosine_similarity(test[i].double(), train[j].double(), dim=0))
                        for j in range(len(train))]
                neighbours = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
                scores = [0.0] * 10
                for j in neighbours:
                    scores[int(train_labels[j])] += math.exp(sims[j] / temperature)
                ranked = sorted(range(10), key=lambda c: -scores[c])
                hits1 += ranked[0] == int(test_labels[i])
                hits5 += int(test_labels[i]) in ranked[:5]
                fewest_voted_classes = min(fewest_voted_classes, sum(s > 0 for s in scores))
            assert top1 == pytest.approx(100 * hits1 / len(test)), (k, temperature)
            if k >= 50:  # top-5 is only defined when >= 5 classes got votes (else zero-score classes tie)
                assert fewest_voted_classes >= 5 and top5 == pytest.approx(100 * hits5 / len(test)), (k, temperature)


# --------------------------------------------------------------------------------------- loading backbones
def expected(name):
    return common.load_file(OFFICIAL_TINY / f"{name}_expected.pth")


@pytest.mark.parametrize("file, num_heads", [("dino_tiny_full_checkpoint.pth", None), ("dino_tiny_backbone_only.pth", 3)])
def test_dino_features_are_the_cls_after_the_final_norm(file, num_heads):
    model, _ = eval_linear.load_backbone(OFFICIAL_TINY / file, num_heads=num_heads)
    reference = expected("dino_tiny")
    features = eval_linear.backbone_features(model, reference["input"], n_last_blocks=2, avgpool=False)
    assert features.shape == (4, 96)  # two CLS tokens of width 48, the last block's last
    torch.testing.assert_close(features[:, 48:], reference["backbone_cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(reference["input"]), reference["backbone_cls"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("file, num_heads", [("ibot_tiny_checkpoint.pth", None), ("ibot_tiny_checkpoint_teacher.pth", 3)])
def test_ibot_features_with_avgpool_patchtokens(file, num_heads):
    model, _ = eval_linear.load_backbone(OFFICIAL_TINY / file, num_heads=num_heads)
    reference = expected("ibot_tiny")
    tokens = reference["tokens"]  # all tokens of the last block after the final norm
    features = eval_linear.backbone_features(model, reference["input"], n_last_blocks=1, avgpool=True)
    torch.testing.assert_close(features, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1), atol=1e-5, rtol=1e-5)


def test_msn_encoder_loads_without_its_projection():
    model, _ = eval_linear.load_backbone(OFFICIAL_TINY / "msn_tiny.pth.tar", num_heads=3)
    reference, fc = expected("msn_tiny"), common.sub_state_dict(
        common.load_file(OFFICIAL_TINY / "msn_tiny.pth.tar")["target_encoder"], "module.fc.")
    x = model(reference["input"])  # the dropped projection MLP, applied by hand, must give MSN's output

    def linear_bn_gelu(x, i):  # eval-mode BN
        x = F.linear(x, fc[f"fc{i}.weight"], fc[f"fc{i}.bias"])
        return F.gelu(F.batch_norm(x, fc[f"bn{i}.running_mean"], fc[f"bn{i}.running_var"], fc[f"bn{i}.weight"],
                                   fc[f"bn{i}.bias"]))
    projection = F.linear(linear_bn_gelu(linear_bn_gelu(x, 1), 2), fc["fc3.weight"], fc["fc3.bias"])
    torch.testing.assert_close(projection, reference["projection"], atol=1e-4, rtol=1e-4)


def test_swav_resnet_loads_without_its_head():
    model, description = eval_linear.load_backbone(OFFICIAL_TINY / "swav_tiny_rn_1111.pth.tar")
    reference = expected("swav_tiny")
    sd = common.strip_prefix(common.load_file(OFFICIAL_TINY / "swav_tiny_rn_1111.pth.tar"), "module.")
    head = {k: v.float() for k, v in common.sub_state_dict(sd, "projection_head.").items()}
    x = eval_linear.backbone_features(model, reference["input"], 4, False)  # convnet: the pooled 2048-d output
    assert x.shape == (4, 2048) and "ResNet" in description
    x = F.batch_norm(F.linear(x, head["0.weight"], head["0.bias"]), head["1.running_mean"], head["1.running_var"],
                     head["1.weight"], head["1.bias"])
    embedding = F.normalize(F.linear(F.relu(x), head["3.weight"], head["3.bias"]), dim=1)
    torch.testing.assert_close(embedding, reference["embedding"], atol=2e-3, rtol=2e-3)  # weights stored in fp16


def test_rob_checkpoint_and_exported_student_timm_load(tmp_path):
    student, _, arch = common.student_backbone("test_vit", img_size=32, patch_size=4)
    teacher = common.create_backbone(arch)  # another random init: the baseline's EMA teacher
    head = {"head.0.weight": torch.zeros(8, 64)}
    torch.save(dict(method="rob_dino", arch=arch,
                    student={**{f"module.backbone.{k}": v for k, v in student.state_dict().items()}, **head},
                    teacher={**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head}),
               tmp_path / "checkpoint.pth")
    common.export_timm(student, arch, tmp_path / "student_timm.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for network, kwargs in [(student, {}), (teacher, dict(checkpoint_key="teacher"))]:
            loaded, description = eval_linear.load_backbone(tmp_path / "checkpoint.pth", **kwargs)
            assert description.startswith("rob_dino") and torch.equal(loaded(x), network.eval()(x))
        loaded, _ = eval_linear.load_backbone(tmp_path / "student_timm.pth", arch="test_vit", patch_size=4, img_size=32)
        assert torch.equal(loaded(x), student(x))
    resnet, _, resnet_arch = common.student_backbone("test_resnet")  # a convnet's classifier is `fc`
    common.export_timm(resnet, resnet_arch, tmp_path / "resnet_timm.pth")
    loaded, _ = eval_linear.load_backbone(tmp_path / "resnet_timm.pth", arch="test_resnet")
    assert torch.equal(loaded(x), resnet.eval()(x))


def test_clear_errors_for_checkpoints_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        eval_linear.load_backbone(tmp_path / "missing.pth")
    data = (OFFICIAL_TINY / "dino_tiny_backbone_only.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match="truncated"):
        eval_linear.load_backbone(tmp_path / "truncated.pth")
    torch.save({"optimizer": {"lr": 0.1}, "weights": torch.zeros(3)}, tmp_path / "unknown.pth")
    with pytest.raises(ValueError, match="cannot read a backbone from .*unknown.pth.*Expected a checkpoint.pth of"):
        eval_linear.load_backbone(tmp_path / "unknown.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="holds a Tensor, not a checkpoint dictionary"):
        eval_linear.load_backbone(tmp_path / "tensor.pth")
    student, _, arch = common.student_backbone("test_vit", img_size=32, patch_size=4)
    common.export_timm(student, arch, tmp_path / "student_timm.pth")
    with pytest.raises(ValueError, match="student_timm.pth.*pass --arch"):
        eval_linear.load_backbone(tmp_path / "student_timm.pth")
    with pytest.raises(ValueError, match="must match the training run"):  # trained at 32 px with patch 4
        eval_linear.load_backbone(tmp_path / "student_timm.pth", arch="test_vit", img_size=224)
    with pytest.raises(ValueError, match="--n_last_blocks 4 exceeds the backbone's 2 blocks"):  # the tiny teachers have 2
        eval_linear.main(eval_linear.get_args_parser().parse_args(
            ["--checkpoint", str(OFFICIAL_TINY / "dino_tiny_full_checkpoint.pth"), "--knn"]))
    torch.save(dict(method="rob_dino", arch=arch, student={}), tmp_path / "rob.pth")
    with pytest.raises(ValueError, match="holds no teacher backbone"):
        eval_linear.load_backbone(tmp_path / "rob.pth", checkpoint_key="teacher")


# ------------------------------------------------------------------------------------- extraction and CLI
def test_two_process_extraction_equals_one_process(tmp_path, image_folder):
    common_args = ["eval_linear.py", "--checkpoint", OFFICIAL_TINY / "dino_tiny_full_checkpoint.pth", "--data_path",
                   image_folder, "--img_size", 64, "--n_last_blocks", 2, "--batch_size_per_gpu", 12, "--num_workers", 0,
                   "--output_dir", tmp_path]
    cpu = {"CUDA_VISIBLE_DEVICES": ""}  # both on CPU (gloo), also on a one-GPU machine
    run_script(common_args + ["--features_cache", tmp_path / "one.pth"], env=cpu)
    # 80 images in batches of 12: rank 0 gets 4 batches, rank 1 three and a padded step; also trains DINO's probe
    run_script(common_args + ["--features_cache", tmp_path / "two.pth", "--linear", "--linear_protocol", "dino",
                              "--epochs", 1], nproc=2, env=cpu)
    one, two = common.load_file(tmp_path / "one.pth"), common.load_file(tmp_path / "two.pth")
    assert one["train"][0].shape == (80, 96) and one["train"][1].bincount().tolist() == [8] * 10
    for split in ("train", "test"):
        assert torch.equal(one[split][0], two[split][0]) and torch.equal(one[split][1], two[split][1]), split


def test_cli_end_to_end(tmp_path, image_folder):
    student, _, arch = common.student_backbone("test_vit", img_size=32, patch_size=4)
    common.export_timm(student, arch, tmp_path / "student_timm.pth")
    args = ["eval_linear.py", "--checkpoint", tmp_path / "student_timm.pth", "--arch", "test_vit", "--patch_size", 4,
            "--img_size", 32, "--data_path", image_folder, "--num_workers", 0, "--batch_size_per_gpu", 32,
            "--output_dir", tmp_path, "--features_cache", tmp_path / "new_folder" / "features.pth"]
    result = run_script(args + ["--knn", "--nb_knn", 5, 20, "--linear", "--epochs", 5, "--low_shot", "--low_shot_seeds", 2])
    log = [json.loads(line) for line in (tmp_path / "eval_log.txt").read_text().splitlines()]
    assert len(log) == 1 and json.loads(result.stdout.strip().splitlines()[-1]) == log[0]
    assert set(log[0]["knn"]) == {"5", "20"} and all(0 <= r["top1"] <= r["top5"] <= 100 for r in log[0]["knn"].values())
    assert log[0]["linear"]["protocol"] == "fast" and log[0]["linear"]["lr"] in eval_linear.FAST_LRS
    assert set(log[0]["low_shot"]) == set(eval_linear.LOW_SHOT)
    assert all(len(r["runs"]) == 2 and 0 <= r["mean"] <= 100 for r in log[0]["low_shot"].values())
    # the DINO protocol in-process, features for its test accuracy from the cache written above
    def main(*extra):
        return eval_linear.main(eval_linear.get_args_parser().parse_args([str(a) for a in args[1:]] + list(extra)))
    results = main("--linear", "--linear_protocol", "dino", "--epochs", "2", "--lr", "0.001", "0.01")
    assert set(results["linear"]["top1_per_lr"]) == {"0.001", "0.01"}
    with pytest.raises(ValueError, match="not extracted with these settings.*delete it or choose another --features_cache"):
        main("--knn", "--nb_knn", "5", "--n_last_blocks", "1")
    with pytest.raises(ValueError, match="exceeds the 80 training images"):
        main("--knn", "--nb_knn", "100")
