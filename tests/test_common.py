"""common.py: backbones of the official releases, checkpoint I/O, data, multi-crop, sampler, errors."""
import argparse
import json
import math
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import rob_dino
from conftest import OFFICIAL_SCHEMAS, OFFICIAL_TINY, ROOT, run_script


def tiny(name):
    return common.load_file(OFFICIAL_TINY / name)


# ----------------------------------------------------------------------------- official tiny checkpoints
def test_dino_backbones_reproduce_official_outputs():
    expected = tiny("dino_tiny_expected.pth")
    full = tiny("dino_tiny_full_checkpoint.pth")
    flat = tiny("dino_tiny_backbone_only.pth")
    for sd, arch_name in [(common.sub_state_dict(full["teacher"], "backbone."), full["args"].arch), (flat, "vit_tiny")]:
        model, arch = common.backbone_from_state_dict(sd, arch_name=arch_name)
        common.load_strict(model, sd, "dino tiny", "DINO ViT")
        assert arch["kwargs"]["num_heads"] == 3 and arch["kwargs"]["patch_size"] == 16
        with torch.no_grad():
            cls = model.eval()(expected["input"])
        torch.testing.assert_close(cls, expected["backbone_cls"], atol=1e-5, rtol=1e-5)


def test_ibot_backbones_reproduce_official_tokens():
    expected = tiny("ibot_tiny_expected.pth")
    for sd in [common.sub_state_dict(tiny("ibot_tiny_checkpoint.pth")["teacher"], "backbone."),
               tiny("ibot_tiny_checkpoint_teacher.pth")["state_dict"]]:
        model, _ = common.backbone_from_state_dict(sd, num_heads=3)
        common.load_strict(model, sd, "ibot tiny", "iBOT ViT")
        with torch.no_grad():
            tokens = model.eval().forward_features(expected["input"])
        torch.testing.assert_close(tokens, expected["tokens"], atol=1e-5, rtol=1e-5)


def test_msn_backbone_reproduces_official_projection():
    expected, ckpt = tiny("msn_tiny_expected.pth"), tiny("msn_tiny.pth.tar")
    sd = common.strip_prefix(ckpt["target_encoder"], "module.")
    backbone_sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    model, _ = common.backbone_from_state_dict(backbone_sd, num_heads=3)
    common.load_strict(model, backbone_sd, "msn tiny", "MSN ViT")
    fc = common.sub_state_dict(sd, "fc.")  # MSN's projection: fc1 bn1 GELU fc2 bn2 GELU fc3 (eval-mode BN)
    with torch.no_grad():
        x = model.eval()(expected["input"])
        for i in (1, 2):
            x = F.linear(x, fc[f"fc{i}.weight"], fc[f"fc{i}.bias"])
            x = F.gelu(F.batch_norm(x, fc[f"bn{i}.running_mean"], fc[f"bn{i}.running_var"], fc[f"bn{i}.weight"],
                                    fc[f"bn{i}.bias"], training=False))
        x = F.linear(x, fc["fc3.weight"], fc["fc3.bias"])
    torch.testing.assert_close(x, expected["projection"], atol=1e-5, rtol=1e-5)


def test_swav_backbone_reproduces_official_embedding():
    expected = tiny("swav_tiny_expected.pth")
    sd = {k: v.float() for k, v in common.strip_prefix(tiny("swav_tiny_rn_1111.pth.tar"), "module.").items()}
    backbone_sd = {k: v for k, v in sd.items() if not k.startswith(("projection_head.", "prototypes."))}
    model, arch = common.backbone_from_state_dict(backbone_sd)
    assert arch["kwargs"]["layers"] == tuple(expected["layers"])
    common.load_strict(model, backbone_sd, "swav tiny", "SwAV ResNet")
    proj = nn.Sequential(nn.Linear(2048, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))
    proj.load_state_dict(common.sub_state_dict(sd, "projection_head."))
    with torch.no_grad():
        embedding = F.normalize(proj.eval()(model.eval()(expected["input"])), dim=1)
    torch.testing.assert_close(embedding, expected["embedding"], atol=1e-4, rtol=1e-4)  # weights stored in fp16


# ------------------------------------------------------------------ full-size official layouts (schemas)
def schema_state_dict(part):
    """Meta tensors (no memory) with the exact keys and shapes of an official release."""
    return {k: torch.empty(v["shape"], device="meta") for k, v in part.items()}


def backbone_part(name):
    schema = json.loads((OFFICIAL_SCHEMAS / name).read_text())
    for key in ("teacher", "target_encoder", "state_dict"):
        if key in schema:
            sd = common.strip_prefix(schema_state_dict(schema[key]), "module.")
            break
    sd = common.sub_state_dict(sd, "backbone.") or sd
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "projection_head.", "prototypes."))}


@pytest.mark.parametrize("name", sorted(p.name for p in OFFICIAL_SCHEMAS.glob("*.json") if "RN50w2" not in p.name))
def test_official_backbone_layouts_load_with_every_key(name):
    sd = backbone_part(name)
    with torch.device("meta"):
        model, arch = common.backbone_from_state_dict(sd)
    common.load_strict(model, sd, name, "official backbone")  # raises on any missing/unexpected/mis-shaped key
    assert set(model.state_dict()) == set(sd)
    if "cls_token" in sd:
        width = sd["cls_token"].shape[-1]
        assert arch["kwargs"]["num_heads"] == common.VIT_NUM_HEADS[width]
        assert arch["kwargs"]["patch_size"] == sd["patch_embed.proj.weight"].shape[-1]


def test_wide_resnet_is_refused_clearly():
    with pytest.raises(ValueError, match="standard-width"):
        with torch.device("meta"):
            common.backbone_from_state_dict(backbone_part("swav_RN50w2_400ep_pretrain.pth.tar.json"))


def test_the_benchmarks_random_teachers_have_the_releases_shapes():
    """benchmarks/step.py times a method's step with a random teacher of an official architecture: the same tensors,
    names and shapes as the release loaded by the method (here from the recorded layouts)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("step", ROOT / "benchmarks" / "step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    with torch.device("meta"):
        for name, patch, width in [("vit_small", 8, 384), ("vit_base", 16, 768), ("vit_large", 7, 1024)]:
            model = step.teacher_backbone(name, patch)
            assert model.embed_dim == width and model.patch_embed.patch_size == (patch, patch)
        assert common.feature_dim(step.teacher_backbone("resnet50")) == 2048
        layout = json.loads((OFFICIAL_SCHEMAS / "dino_vitbase16_pretrain_full_checkpoint.json").read_text())
        release = dict(teacher=schema_state_dict(layout["teacher"]), args=argparse.Namespace(arch="vit_base"))
        loaded = rob_dino.teacher_from_checkpoint(release, "dino_vitb16")
        random = step.random_teacher(rob_dino, "dino_vitb16")
    assert {k: v.shape for k, v in random.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}


# --------------------------------------------------------------------------------------- checkpoint I/O
def test_load_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        common.load_file(tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    torch.save({"a": torch.randn(1000)}, good)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(good.read_bytes()[:500])
    with pytest.raises(RuntimeError, match="truncated"):
        common.load_file(broken)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(RuntimeError, match="cannot read"):
        common.load_file(text)


def test_load_file_allows_namespace_but_no_arbitrary_objects(tmp_path):
    import argparse
    ok = tmp_path / "ok.pth"
    torch.save({"args": argparse.Namespace(arch="vit_small"), "w": torch.ones(2)}, ok)
    assert common.load_file(ok)["args"].arch == "vit_small"
    evil = tmp_path / "evil.pth"
    torch.save({"obj": Image.new("RGB", (2, 2))}, evil)  # a pickled class outside the allow-list
    with pytest.raises(RuntimeError, match="cannot read"):
        common.load_file(evil)


def test_load_strict_names_missing_unexpected_and_shapes():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError) as err:
        common.load_strict(model, {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}, "f.pth", "a Linear")
    message = str(err.value)
    assert "f.pth" in message and "a Linear" in message and "bias" in message and "extra" in message
    assert "weight: file (2, 4) vs model (2, 3)" in message


def test_strip_and_sub_state_dict():
    sd = {"module.backbone.a": 1, "module.head.b": 2}
    assert common.strip_prefix(sd, "module.", "backbone.") == {"a": 1, "head.b": 2}
    assert common.sub_state_dict(common.strip_prefix(sd, "module."), "head.") == {"b": 2}


def test_save_atomic_survives_a_kill_during_the_write(tmp_path):
    path = tmp_path / "checkpoint.pth"
    common.save_atomic({"version": 1, "w": torch.ones(3)}, path)
    writer = textwrap.dedent(f"""
        import sys, torch; sys.path.insert(0, {str(ROOT)!r}); import common
        print("writing", flush=True)
        common.save_atomic({{"version": 2, "w": torch.randn(150_000_000)}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".checkpoint.pth.*.tmp")) and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()  # SIGKILL while the 600 MB temporary file is being written
    proc.wait()
    assert torch.load(path)["version"] == 1  # the previous checkpoint is untouched


def test_export_timm_loads_with_timm_pretrained_cfg_overlay(tmp_path):
    model, dim, arch = common.student_backbone("vit_tiny", img_size=32, patch_size=4)
    path = tmp_path / "student_timm.pth"
    call = common.export_timm(model, arch, path)
    assert "vit_tiny_patch16_224" in call and "patch_size=4" in call and "custom_load=False" in call
    loaded = timm.create_model("vit_tiny_patch16_224", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path), custom_load=False),
                               img_size=32, patch_size=4, dynamic_img_size=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().forward_head(loaded.forward_features(x), pre_logits=True),
                                   model.eval()(x))
        assert loaded(x).abs().max() == 0  # the exported classifier is zero: no trained classifier exists
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, img_size=32, patch_size=4,
                              pretrained_cfg_overlay=dict(file=str(path), custom_load=False))
    assert fresh.head.out_features == 10


def test_cosine_schedule():
    values = rob_dino.cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=10, warmup_epochs=1, warmup_start=0.0)
    assert len(values) == 40
    assert values[0] == 0.0 and abs(values[10] - 1.0) < 1e-12  # warm-up reaches the base, then cosine starts
    assert all(a <= b + 1e-12 for a, b in zip(values[:10], values[1:11]))
    assert all(a >= b - 1e-12 for a, b in zip(values[10:], values[11:]))
    assert abs(values[-1] - (0.1 + 0.45 * (1 + math.cos(29 / 30 * math.pi)))) < 1e-12
    args = rob_dino.get_args_parser().parse_args(["--data_path", "synthetic", "--epochs", "2", "--warmup_epochs", "2"])
    with pytest.raises(ValueError, match="--warmup_epochs 2 leaves nothing of a 2-epoch run"):
        rob_dino.check_args(args)  # refused before any schedule is built


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    model, _, _ = common.student_backbone("test_vit", img_size=32, patch_size=8)
    decay, no_decay = rob_dino.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------- model builders
def test_build_student_aliases_and_timm_names():
    model, dim, arch = common.student_backbone("vit_tiny", img_size=32, patch_size=4)
    assert dim == 192 and model(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 192)  # local crops of another size work
    model, dim, arch = common.student_backbone("mobilenet_v3")  # the reference reads the 960-d pooled features
    assert dim == 960 and model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 960)
    assert "conv_head.weight" not in model.state_dict() and common.create_backbone(arch).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 960)
    model, dim, _ = common.student_backbone("resnet18")  # torchvision's init: no zero-initialised last BN per block
    assert dim == 512 and all(block.bn2.weight.eq(1).all() for layer in (model.layer1, model.layer4) for block in layer)
    model, dim, arch = common.student_backbone("test_vit", img_size=32, patch_size=4, drop_path_rate=0.1)
    assert arch == dict(name="test_vit", kwargs=dict(num_classes=0, drop_path_rate=0.1, img_size=32,
                                                     dynamic_img_size=True, patch_size=4))
    rebuilt = common.create_backbone(arch)
    assert set(rebuilt.state_dict()) == set(model.state_dict())


def test_unknown_student_lists_the_aliases():
    with pytest.raises(ValueError, match="vit_tiny, vit_small, vit_base, resnet18, resnet34, resnet50, mobilenet_v3"):
        common.student_backbone("vit_tinny")


# ------------------------------------------------------------------------------------------------- data
def test_fashion_mnist_is_real_data():
    images, labels = common.load_fashion_mnist(train=False)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert sorted(torch.bincount(labels).tolist()) == [1000] * 10
    image, label = common.FashionMNIST(train=False)[0]
    assert image.size == (28, 28) and image.mode == "RGB" and label == int(labels[0])


def test_multicrop_shapes_and_values():
    aug = common.MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=3)
    image = Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())
    crops = aug(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3 == aug.crop_shapes
    mean, std = torch.tensor(common.IMAGENET_MEAN)[:, None, None], torch.tensor(common.IMAGENET_STD)[:, None, None]
    for crop in crops:
        assert crop.dtype == torch.float32
        pixels = crop * std + mean  # undo the normalisation: values must be valid intensities
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert not torch.equal(crops[2], crops[3])  # each local crop is its own random view


def test_augmentation_is_reproducible_per_sample(fashion_mnist_folder):
    aug = common.MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=2)
    dataset = common.AugmentedDataset(common.build_dataset(str(fashion_mnist_folder)), aug, seed=3)
    first, again, other_epoch = dataset[(0, 5)][0], dataset[(0, 5)][0], dataset[(1, 5)][0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other_epoch[0])


def test_corrupt_images_are_skipped_and_counted(tmp_path, fashion_mnist_folder):
    folder = tmp_path / "data"
    (folder / "a").mkdir(parents=True)
    for i, src in enumerate(sorted((fashion_mnist_folder / "class0").iterdir())[:3]):
        (folder / "a" / f"{i}.png").write_bytes(src.read_bytes())
    jpeg = folder / "a" / "0_truncated.jpg"
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (folder / "a" / "0_text.png").write_text("not an image")
    dataset = common.AugmentedDataset(common.build_dataset(str(folder)), common.eval_transform(32))
    assert len(dataset) == 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [dataset[(0, i)] for i in range(len(dataset))]
    assert all(s[0].shape == (3, 32, 32) for s in samples)
    # sorted files: 0.png 0_text.png 0_truncated.jpg 1.png 2.png; sample 1 falls through two bad files, sample 2
    # through one of the same: three attempts, two unreadable images (counted once each, however often they are hit)
    assert dataset.num_skipped == 2 and dataset.unreadable.nonzero()[:, 0].tolist() == [1, 2]
    assert sum("skipping unreadable image" in str(w.message) for w in caught) == 3
    [dataset[(1, i)] for i in range(len(dataset))]  # another epoch: the same two images
    assert dataset.num_skipped == 2
    assert torch.equal(samples[1][0], samples[3][0])  # both fell back to 1.png


def test_synthetic_dataset():
    dataset = common.build_dataset("synthetic", synthetic_shapes=[(3, 8, 8), (3, 4, 4)])
    crops, label = dataset[(0, 7)]
    assert [c.shape for c in crops] == [(3, 8, 8), (3, 4, 4)] and 0 <= label < 1000
    assert torch.equal(crops[0], dataset[(3, 7)][0][0])


def test_loader_refuses_a_dataset_smaller_than_a_batch():
    with pytest.raises(ValueError, match="--batch_size_per_gpu"):
        common.build_loader(common.SyntheticDataset([(3, 4, 4)], length=5), batch_size=8, num_workers=0)


SHARD_SCRIPT = """
import json, os, sys, torch.distributed
sys.path.insert(0, {root!r})
import common
common.init_distributed()
rank = torch.distributed.get_rank()
dataset = common.SyntheticDataset([(1,)], length=40)
loader, sampler = common.build_loader(dataset, batch_size=4, num_workers=0, seed=1)
out = {{}}
for epoch, start in [(0, 0), (1, 0), (1, 2)]:
    sampler.set_epoch(epoch, start_batch=start)
    out[f"{{epoch}}_{{start}}"] = [key for key in sampler]
json.dump(out, open(os.path.join({out!r}, f"rank{{rank}}.json"), "w"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_two_process_sampler_gives_disjoint_shards_covering_the_data(tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    run_script([script], nproc=2, timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for key in ("0_0", "1_0"):
        shards = [[i for _, i in rank[key]] for rank in ranks]
        assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(40))
        assert all(e == int(key[0]) for rank in ranks for e, _ in rank[key])
    assert ranks[0]["0_0"] != ranks[0]["1_0"]  # reshuffled every epoch
    for rank in ranks:  # resuming at batch 2 skips exactly the first two batches of that epoch
        assert rank["1_2"] == rank["1_0"][2 * 4:]


def test_random_subset_is_seeded_and_checked():
    dataset = common.SyntheticDataset([(1,)], length=50)
    subset = common.random_subset(dataset, 10, seed=3)
    assert len(subset) == 10 and subset.indices == common.random_subset(dataset, 10, seed=3).indices
    assert subset.indices != common.random_subset(dataset, 10, seed=4).indices
    assert common.random_subset(dataset, 0) is dataset
    with pytest.raises(ValueError, match="--subset 60"):
        common.random_subset(dataset, 60)
