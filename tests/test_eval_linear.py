"""eval_linear.py: the weighted k-NN's properties (the course's exercise 4: votes of the k nearest, -inf for a
class without a vote, independent of the features' lengths and of the chunking; the instructor's grading tests
hold the slow loop); the linear probe on separable features, on random labels, and standardized with the train
statistics only; fine-tuning that trains every weight and leaves the caller's backbone alone; the k-NN of two
gloo processes equal to one; load_backbone on this repo's checkpoints, timm state dicts and garbage; main() on
folders where train and test relate in a known way (same colours: 100%; swapped colours: 0%), with the
pretraining normalization, a validation split that never touches test, and on the shipped CIFAR-10 sample."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import data
import eval_linear
import vit

SAMPLE = str(data.SAMPLE_DIR)


# ---- weighted k-NN ----

@pytest.mark.ex_knn
def test_knn_scores_are_votes_of_the_k_nearest():
    """Exercise 4's checks (the grade, against a slow loop, is the instructor's). Catches scores of the wrong
    shape, more classes voted for than there are neighbours, a class without a vote that is not -inf, a vote
    that is not positive, scores that depend on the features' lengths (no cosine) or on chunk_size, and a 1-NN
    that does not find a point in the training set itself."""
    g = torch.Generator().manual_seed(0)
    train, labels, test = torch.randn(30, 8, generator=g), torch.randint(4, (30,), generator=g), torch.randn(5, 8)
    scores = eval_linear.knn_classify(train, labels, test, num_classes=4, k=3, temperature=0.1)
    assert scores.shape == (5, 4) and scores.dtype == torch.float32
    voted = torch.isfinite(scores)
    assert (voted.sum(dim=1) >= 1).all() and (voted.sum(dim=1) <= 3).all()
    assert (scores[voted] > 0).all() and torch.isneginf(scores[~voted]).all()
    torch.testing.assert_close(eval_linear.knn_classify(2 * train, labels, 0.5 * test, 4, 3, 0.1), scores)
    torch.testing.assert_close(eval_linear.knn_classify(train, labels, test, 4, 3, 0.1, chunk_size=2), scores)
    nearest = eval_linear.knn_classify(train, labels, train[:10], 4, k=1, temperature=0.1).argmax(dim=1)
    assert torch.equal(nearest, labels[:10])


@pytest.mark.needs_knn
def test_knn_eval_restores_mode_and_separates_clusters():
    """Catches knn_eval leaving the backbone in eval mode, or features that lose the image-label pairing."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    # two classes of images with opposite constant colours: trivially separable in any feature space
    x = torch.cat([torch.full((20, 3, 8, 8), 1.0), torch.full((20, 3, 8, 8), -1.0)]) + 0.1 * torch.randn(40, 3, 8, 8)
    y = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    for train_mode in (True, False):
        model.train(train_mode)
        assert eval_linear.knn_eval(model, loader, loader, "cpu", k=5) == 100.0
        assert model.training == train_mode
    feats, labels = eval_linear.extract_features(model, loader, "cpu")
    assert feats.shape == (40, 32) and feats.dtype == torch.float32 and torch.equal(labels, y)
    torch.testing.assert_close(feats, model.eval()(x))


# ---- linear probe and fine-tuning ----

def synthetic(n, dim=32, classes=10, seed=0):
    """Labels from one fixed random linear classifier, keeping only points with a logit margin > 1: linearly
    separable with a margin. Features far from standardized (x40, +7): the probe has to standardize."""
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(123))
    x = torch.randn(4 * n, dim, generator=torch.Generator().manual_seed(seed))
    top2 = (x @ w).topk(2, dim=1)
    keep = (top2.values[:, 0] - top2.values[:, 1] > 1.0).nonzero()[:n, 0]
    assert len(keep) == n
    return 40 * x[keep] + 7, top2.indices[keep, 0]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_linear_probe_separable_and_random_labels(optimizer):
    """Catches a probe that cannot fit separable features at any scale, or that leaks labels (random labels
    must stay at chance)."""
    x_train, y_train = synthetic(3000, seed=0)
    x_test, y_test = synthetic(1000, seed=1)
    res = eval_linear.linear_probe(x_train, y_train, x_test, y_test, 10, epochs=50, optimizer=optimizer)
    assert res["top1"] > 97 and res["top5"] > 99, res
    # labels independent of the features: nothing generalizes, test accuracy is chance (10% +- 1% std)
    g = torch.Generator().manual_seed(2)
    res = eval_linear.linear_probe(x_train, torch.randint(10, (3000,), generator=g), x_test,
                                   torch.randint(10, (1000,), generator=g), 10, epochs=50, optimizer=optimizer)
    assert 5 < res["top1"] < 15 and 40 < res["top5"] < 60, res


def test_linear_probe_standardizes_with_train_statistics_only():
    """Catches a probe that standardizes the test features with the test set's own mean and std."""
    # 1-D features: class 0 at -1, class 1 at +1 (train mean 0, std 1); the test points are all class 1, at
    # 0.5 and 1.5: with the train statistics all are on the class-1 side; standardized by their own mean (1)
    # and std (0.5) half of them would land at -1, in class 0
    x_train = torch.tensor([-1.0, 1.0]).repeat(200)[:, None]
    y_train = torch.tensor([0, 1]).repeat(200)
    x_test = torch.tensor([0.5, 1.5]).repeat(50)[:, None]
    res = eval_linear.linear_probe(x_train, y_train, x_test, torch.ones(100, dtype=torch.long), 2, epochs=20)
    assert res["top1"] == 100.0, res


def test_finetune_trains_every_weight_and_leaves_the_backbone_alone():
    """Catches fine-tuning that trains only the head (a frozen backbone, or the patch projection left frozen
    as pretraining had it), or that modifies the caller's backbone."""
    torch.manual_seed(0)
    backbone = vit.VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                     freeze_patch_embed=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    # class = which colour channel is bright
    y = torch.arange(3).repeat(40)
    x = 0.3 * torch.randn(120, 3, 8, 8) + F.one_hot(y, 3).float()[:, :, None, None]
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True)
    res, tuned = eval_linear.finetune(backbone, loader, DataLoader(TensorDataset(x, y), batch_size=64), 3,
                                      epochs=5, lr=3e-3, device="cpu")
    assert res["top1"] > 90 and res["top5"] == 100.0, res
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    for name, p in tuned[0].named_parameters():
        assert name == "pos_embed" or not torch.equal(p.cpu(), before[name]), f"{name} did not train"
    assert torch.equal(tuned[0].pos_embed.cpu(), before["pos_embed"])  # the sin-cos table is a fixed function


def _gather_worker(rank, world, port, x, y, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    loader = data.build_loader(TensorDataset(x, y), 8, 0, train=False)
    out[rank] = {"shard": len(loader.sampler), "feats": eval_linear.gather_features(
        *eval_linear.extract_features(model, loader, "cpu")), "knn": eval_linear.knn_eval(model, loader, loader, "cpu", k=3)}
    dist.destroy_process_group()


@pytest.mark.needs_knn
def test_knn_of_two_processes_equals_one():
    """Catches a sharded k-NN monitor that gathers only its own shard, drops or pads images, or makes every
    process extract everything."""
    import torch.multiprocessing as mp
    from common import free_port
    torch.manual_seed(1)
    x, y = torch.randn(37, 3, 8, 8), torch.randint(3, (37,))  # 37: shards of 19 and 18
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(2, free_port(), x, y, out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    feats, labels = eval_linear.extract_features(model, loader, "cpu")
    assert (out[0]["shard"], out[1]["shard"]) == (19, 18)
    for r in range(2):
        got_feats, got_labels = out[r]["feats"]
        order = torch.cat([torch.arange(0, 37, 2), torch.arange(1, 37, 2)])  # rank 0's images, then rank 1's
        torch.testing.assert_close(got_feats, feats[order])
        assert torch.equal(got_labels, labels[order])
        assert out[r]["knn"] == eval_linear.knn_eval(model, loader, loader, "cpu", k=3)


# ---- load_backbone ----

def design_checkpoint(path, vit_kwargs, args=None, seed=0):
    """A checkpoint as every method writes it (DESIGN.md), with stand-ins for the method's own parts."""
    torch.manual_seed(seed)
    model = vit.VisionTransformer(**vit_kwargs)
    head = torch.nn.Linear(model.embed_dim, 16)
    torch.save({"method": "byol", "epoch": 7, "args": args or {"dataset": "folder", "data_dir": SAMPLE},
                "vit_kwargs": model.kwargs, "backbone": model.state_dict(),
                "model": {"projector." + k: v for k, v in head.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}, "state": {"step": 70}}, path)
    return model.eval()


@pytest.mark.parametrize("kw", [dict(patch_size=8), dict(patch_size=4, pos_embed="learned", freeze_patch_embed=True)])
def test_load_backbone_design_checkpoint(tmp_path, kw):
    model = design_checkpoint(tmp_path / "checkpoint.pt", vit.vit_mini(img_size=32, **kw).kwargs)
    loaded, meta = eval_linear.load_backbone(tmp_path / "checkpoint.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert loaded.kwargs == model.kwargs
    assert (meta["method"], meta["epoch"], meta["pretrain_dataset"]) == ("byol", 7, "folder")
    assert meta["arch"] == f"vit_mini/{kw['patch_size']} @32px"


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict"])
def test_load_backbone_timm_state_dict(tmp_path, wrap):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    ref = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2,
                                     num_classes=10).eval()
    sd = ref.state_dict()
    assert "head.weight" in sd
    torch.save({"plain": sd, "model": {"model": sd, "epoch": 300}, "state_dict": {"state_dict": sd}}[wrap],
               tmp_path / "deit.pth")
    ours, meta = eval_linear.load_backbone(tmp_path / "deit.pth")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)  # CLS after the final norm
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    assert ours.kwargs["pos_embed"] == "learned" and ours.num_heads == 2
    assert meta["arch"] == "ViT-D128-L2-H2/8 @32px" and meta["method"] == "deit"


def test_load_backbone_timm_num_heads_override(tmp_path):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    ref = timm_vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=4,
                                     num_classes=0).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    ours, _ = eval_linear.load_backbone(tmp_path / "w.pth", num_heads=4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.forward_features(x)[:, 0], rtol=1e-5, atol=1e-5)


def test_load_backbone_bad_files(tmp_path):
    def message(path):
        with pytest.raises(SystemExit) as e:
            eval_linear.load_backbone(path)
        assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
        return e.value.code

    assert "not found" in message(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint" * 10)
    assert "not a checkpoint readable with torch.load" in message(tmp_path / "garbage.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "expected a dict" in message(tmp_path / "list.pt")
    torch.save({"epoch": 3, "weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert "expected a checkpoint of this repo" in message(tmp_path / "other.pt")
    model = vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    sd = model.state_dict()
    del sd["norm.bias"]
    torch.save({"method": "moco", "epoch": 1, "vit_kwargs": model.kwargs, "backbone": sd}, tmp_path / "broken.pt")
    assert "do not fit" in message(tmp_path / "broken.pt") and "norm.bias" in message(tmp_path / "broken.pt")


# ---- main, end to end ----

def colour_folder(root, swap_test=False, n=12):
    """train/{blue,red}/: noisy blue or red 32 px images; test/ the same, or with the colours swapped (red
    images filed under blue/): data where train and test relate in a known way."""
    g = torch.Generator().manual_seed(0)
    colours = {"blue": (40, 60, 200), "red": (200, 50, 40)}
    for split in ("train", "test"):
        for cls, rgb in colours.items():
            if split == "test" and swap_test:
                rgb = colours["red" if cls == "blue" else "blue"]
            os.makedirs(root / split / cls)
            for i in range(n):
                pixels = torch.tensor(rgb) + torch.randint(-30, 31, (32, 32, 3), generator=g)
                Image.fromarray(pixels.clamp(0, 255).byte().numpy()).save(root / split / cls / f"{i}.png")
    return str(root)


@pytest.mark.needs_knn
@pytest.mark.parametrize("swap", [False, True])
def test_main_scores_the_test_split(tmp_path, swap):
    """Catches k-NN or probe scored on the training features (swapped test colours must score 0, not 100)."""
    folder = colour_folder(tmp_path / "colours", swap_test=swap)
    kw = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2).kwargs
    design_checkpoint(tmp_path / "checkpoint.pt", kw, args={"dataset": "folder", "data_dir": folder}, seed=1)
    rows = eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--random-init", "--workers", "0",
                             "--probe-epochs", "20"])
    expected = 0.0 if swap else 100.0
    for r in rows:
        assert (r["knn_top1"], r["linear_top1"], r["num_train"], r["num_test"]) == (expected, expected, 24, 24), r


@pytest.mark.needs_knn
def test_main_val_fraction_never_touches_test(tmp_path):
    """Catches a --val-fraction that still scores the test split, or a split that is not stratified."""
    folder = colour_folder(tmp_path / "colours", swap_test=True)  # test would score 0
    rows = eval_linear.main(["--random-init", "--arch", "vit_mini", "--patch-size", "8", "--dataset", "folder",
                             "--data-dir", folder, "--workers", "0", "--probe-epochs", "20", "--val-fraction", "0.25"])
    r = rows[0]
    assert (r["num_train"], r["num_test"]) == (18, 6) and r["eval_data"] == "folder:colours (val 0.25 of train)"
    assert r["knn_top1"] == r["linear_top1"] == 100.0
    train_idx, val_idx = eval_linear.stratified_split([0] * 12 + [1] * 8, 0.25, seed=0)
    assert len(val_idx) == 5 and sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(20))
    assert (val_idx < 12).sum() == 3 and torch.equal(val_idx, eval_linear.stratified_split([0] * 12 + [1] * 8, 0.25)[1])
    assert not torch.equal(val_idx, eval_linear.stratified_split([0] * 12 + [1] * 8, 0.25, seed=1)[1])


@pytest.mark.needs_knn
def test_main_label_fraction_sees_the_drawn_labels_only(monkeypatch):
    """Catches a --label-fraction whose k-NN, probe or fine-tuning sees other train images than the stratified draw
    (the study's 1% / 10% columns would not be what the flag reproduces), a draw that ignores --label-seed, or a
    --val-fraction carved from all of train instead of the labelled images: against k-NN and probe run by hand on
    the full train features at stratified_split(labels, F, label seed)'s held-out part."""
    base = ["--random-init", "--arch", "vit_mini", "--patch-size", "8", "--dataset", "folder", "--data-dir", SAMPLE,
            "--workers", "0", "--probe-epochs", "20", "--seed", "2"]
    row = eval_linear.main([*base, "--label-fraction", "0.1", "--label-seed", "3"])[0]
    train = data.build_dataset("folder", SAMPLE, "train")
    labels = torch.tensor(train.targets)
    _, labelled = eval_linear.stratified_split(labels, 0.1, seed=3)
    assert row["num_train"] == len(labelled) == 100 and torch.bincount(labels[labelled]).tolist() == [10] * 10
    assert row["eval_data"] == "folder:data_sample (0.1 of the train labels)" and row["label_seed"] == 3
    torch.manual_seed(2)  # the untrained network main() builds with --seed 2
    backbone = vit.vit_mini(img_size=32, patch_size=8).eval()
    mean_std = data.MEAN_STD["folder"]
    xtr, ytr = eval_linear.extract_features(backbone, data.build_eval_loader(train, 32, *mean_std, 256, 0), "cpu")
    test = data.build_dataset("folder", SAMPLE, "test")
    xte, yte = eval_linear.extract_features(backbone, data.build_eval_loader(test, 32, *mean_std, 256, 0), "cpu")
    assert row["knn_top1"] == eval_linear.knn_accuracy(xtr[labelled], ytr[labelled], xte, yte, 10)[0]
    probe = eval_linear.linear_probe(xtr[labelled], ytr[labelled], xte, yte, 10, epochs=20, seed=2)
    assert row["linear_top1"] == probe["top1"]
    other = eval_linear.main([*base, "--label-fraction", "0.1", "--no-probe"])[0]  # label seed: --seed's 2
    assert other["label_seed"] == 2 and other["knn_top1"] == eval_linear.knn_accuracy(
        xtr[eval_linear.stratified_split(labels, 0.1, seed=2)[1]], ytr[eval_linear.stratified_split(
            labels, 0.1, seed=2)[1]], xte, yte, 10)[0]
    # fine-tuning trains on the labelled images and nothing else; --val-fraction holds out some of *them*
    seen = {"eval": []}  # the train-split indices each loader was built on
    train_loader, eval_loader = data.build_train_loader, data.build_eval_loader
    monkeypatch.setattr(data, "build_train_loader", lambda ds, *a, **k: seen.update(tune=data._base(ds)[1]) or
                        train_loader(ds, *a, **k))
    monkeypatch.setattr(data, "build_eval_loader", lambda ds, *a, **k: seen["eval"].append(data._base(ds)[1]) or
                        eval_loader(ds, *a, **k))
    monkeypatch.setattr(eval_linear, "finetune", lambda *a, **k: ({"top1": 0.0, "top5": 0.0}, None))
    eval_linear.main([*base, "--label-fraction", "0.1", "--label-seed", "3", "--no-probe", "--finetune",
                      "--val-fraction", "0.2", "--batch-size", "32"])  # (80 images: a batch of 256 makes no step)
    # k-NN's memory bank, the validation images, fine-tuning's images: indices into the train split
    (bank, val), tune = ([int(i) for i in ix] for ix in seen["eval"]), [int(i) for i in seen["tune"]]
    assert len(bank) == len(tune) == 80 and sorted(bank) == sorted(tune) and len(val) == 20
    assert set(bank) | set(val) == set(labelled.tolist())
    with pytest.raises(SystemExit) as refused:  # argparse's one line, before any work
        eval_linear.main([*base, "--label-fraction", "0"])
    assert refused.value.code == 2


@pytest.mark.needs_knn
def test_main_random_init(tmp_path, capsys):
    """Catches a table or results line that misreports what was evaluated, on real images."""
    results = tmp_path / "results.jsonl"
    rows = eval_linear.main(["--random-init", "--arch", "vit_mini", "--patch-size", "8", "--dataset", "folder",
                             "--data-dir", SAMPLE, "--workers", "0", "--probe-epochs", "20",
                             "--results", str(results)])
    out = capsys.readouterr().out
    assert "| method | epochs | arch | eval data | k-NN top-1 | linear top-1 | linear top-5 |" in out
    assert "| random init | 0 | vit_mini/8 @32px | folder:data_sample |" in out
    line = json.loads(results.read_text())  # exactly one line
    assert line == rows[0]
    assert (line["num_train"], line["num_test"]) == (len(data.build_dataset("folder", SAMPLE, "train")),
                                                     len(data.build_dataset("folder", SAMPLE, "test")))
    assert 15 < line["knn_top1"] <= line["knn_top5"] and 15 < line["linear_top1"] <= line["linear_top5"]


@pytest.mark.needs_knn
def test_main_checkpoint_with_finetune(tmp_path, capsys):
    """Catches a fine-tuning learning rate that ignores the batch size its help promises to scale with."""
    kw = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2).kwargs
    design_checkpoint(tmp_path / "checkpoint.pt", kw, seed=0)
    results = tmp_path / "results.jsonl"
    rows = eval_linear.main(["--ckpt", str(tmp_path / "checkpoint.pt"), "--workers", "0", "--probe-epochs", "10",
                             "--finetune", "--finetune-epochs", "1", "--batch-size", "128", "--results", str(results)])
    out = capsys.readouterr().out
    assert "| finetune top-1 |" in out and "| byol (student) | 7 | ViT-D64-L2-H2/8 @32px | folder:data_sample |" in out
    lines = [json.loads(s) for s in results.read_text().splitlines()]
    assert [r["method"] for r in lines] == ["byol"] and lines == rows
    assert lines[0]["dataset"] == "folder" and lines[0]["data_dir"] == SAMPLE and not lines[0]["transfer"]
    assert 0 <= lines[0]["finetune_top1"] <= 100
    assert lines[0]["finetune"] == {"epochs": 1, "lr": 5e-4 * 128 / 256}


@pytest.mark.needs_knn
@pytest.mark.parametrize("flags, path", [([], "batched"), (["--aug", "pil"], "pil")])
def test_finetune_views_are_the_finetune_recipe_on_the_path_aug_names(tmp_path, capsys, monkeypatch, flags, path):
    """Catches fine-tuning on un-augmented images or another recipe than data.finetune_spec (MoCo v2's crop of
    20-100% of the area and a flip, no colour), with another normalization or seed than the run's, or on another
    path than --aug names (auto: batched, as the training scripts)."""
    spec = data.finetune_spec(16)
    assert (spec.size, spec.scale, spec.flip_p, spec.jitter_p, spec.gray_p, spec.blur_p, spec.solarize_p) == (
        16, (0.2, 1.0), 0.5, 0.0, 0.0, 0.0, 0.0)
    kw = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=64, depth=1, num_heads=2).kwargs
    design_checkpoint(tmp_path / "c.pt", kw)
    calls, taken = [], []
    monkeypatch.setattr(data, "build_train_loader", lambda *a, real=data.build_train_loader, **k: (
        calls.append((a, k)) or real(*a, **k)))
    monkeypatch.setattr(data, "build_device_loader", lambda *a, real=data.build_device_loader, **k: (
        taken.append("batched") or real(*a, **k)))
    eval_linear.main(["--ckpt", str(tmp_path / "c.pt"), "--workers", "0", "--no-probe", "--finetune",
                      "--finetune-epochs", "1", "--batch-size", "128", "--seed", "3", *flags])
    (args, kwargs), = calls
    assert args[1] == [spec] and tuple(map(tuple, args[2:4])) == data.MEAN_STD["folder"]
    assert kwargs["seed"] == 3 and kwargs["aug"] == (flags[1] if flags else "auto")
    assert taken == (["batched"] if path == "batched" else [])
    assert f"augmentation: {path} (" in capsys.readouterr().out


@pytest.mark.needs_knn
def test_main_transfer_uses_the_pretraining_normalization(tmp_path, capsys, monkeypatch):
    """Catches a transfer evaluation that normalizes with the evaluation data's constants instead of the ones
    the backbone was pretrained with (CIFAR-10's here; ImageNet's for timm weights)."""
    kw = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2).kwargs
    design_checkpoint(tmp_path / "c.pt", kw, args={"dataset": "cifar10", "data_dir": str(tmp_path / "nowhere")})
    seen = []
    real = eval_linear.extract_features
    monkeypatch.setattr(eval_linear, "extract_features", lambda m, loader, d: seen.append(next(iter(loader))[0]) or
                        real(m, loader, d))
    rows = eval_linear.main(["--ckpt", str(tmp_path / "c.pt"), "--dataset", "folder", "--data-dir", SAMPLE,
                             "--workers", "0", "--no-probe", "--img-size", "16"])  # 16 px: a 2x2 patch grid
    assert rows[0]["transfer"] and rows[0]["eval_data"] == "folder:data_sample (transfer)"
    assert rows[0]["img_size"] == 16 and rows[0]["linear_top1"] is None
    assert rows[0]["normalization"] == {"mean": list(data.MEAN_STD["cifar10"][0]), "std": list(data.MEAN_STD["cifar10"][1])}
    first_image, _ = data.build_dataset("folder", SAMPLE, "train", data.eval_transform(16, *data.MEAN_STD["cifar10"]))[0]
    torch.testing.assert_close(seen[0][0], first_image)
    assert "| byol (student) | 7 | ViT-D64-L1-H2/8 @32px | folder:data_sample (transfer) |" in capsys.readouterr().out


def test_main_usage_errors():
    """Catches tracebacks instead of one-line messages for missing models, architectures or data."""
    for argv, msg in [([], "nothing to evaluate"), (["--random-init"], "needs --arch"),
                      (["--random-init", "--arch", "vit_mini", "--dataset", "folder"], "needs --data-dir")]:
        with pytest.raises(SystemExit, match=msg):
            eval_linear.main(argv)
    with pytest.raises(SystemExit) as refused:  # a bad value: argparse's one line (tests/test_bad_input.py)
        eval_linear.main(["--random-init", "--arch", "vit_mini", "--dataset", "folder", "--data-dir", SAMPLE,
                          "--val-fraction", "2"])
    assert refused.value.code == 2


def test_knn_monitor_validation_queries_are_held_out_of_train(tiny_data):
    """Catches a validation monitor (the training scripts' --val-fraction) that reads the test split, keeps its
    queries in the memory bank too (each query would find itself), loses train images, or is not stratified; a
    plain monitor (0) that is not train against test; and queries that keep images it was told to leave out (a
    network's own training images) or a bank that loses them."""
    def images(loader):
        return [(x.numpy().tobytes(), int(y)) for xb, yb in loader for x, y in zip(xb, yb)]

    mean_std = data.MEAN_STD["folder"]
    train, test = (images(loader) for loader in eval_linear.knn_monitor_loaders("folder", tiny_data, 32, *mean_std,
                                                                                  0, 0.0))
    assert len(train) == 200 and len(test) == 100
    bank, queries = (images(loader) for loader in eval_linear.knn_monitor_loaders("folder", tiny_data, 32, *mean_std,
                                                                                    0, 0.2))
    assert sorted(bank + queries) == sorted(train)  # every query from train, none in the bank, no image lost
    assert not {x for x, _ in queries} & {x for x, _ in test} and not {x for x, _ in queries} & {x for x, _ in bank}
    assert sorted(y for _, y in queries) == sorted(list(range(10)) * 4)  # 0.2 of each class's 20 images
    train_set = data.build_dataset("folder", tiny_data, "train")  # the queries less images a network trained on:
    held = eval_linear.stratified_split(data.labels(train_set), 0.2)[1].tolist()
    banked = next(i for i in range(len(train_set)) if i not in held)  # excluded from the queries: stays in the bank
    bank2, fewer = (images(loader) for loader in eval_linear.knn_monitor_loaders("folder", tiny_data, 32, *mean_std,
                                                                                  0, 0.2, exclude=held[:5] + [banked]))
    gone = {x for x, _ in images(data.build_eval_loader(torch.utils.data.Subset(train_set, held[:5]), 32,
                                                            *mean_std, 256, 0))}
    assert bank2 == bank and len(fewer) == len(queries) - 5 and not {x for x, _ in fewer} & gone
