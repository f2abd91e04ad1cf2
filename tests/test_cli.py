"""What a newcomer meets at the command line of every method file and of eval_linear.py: --help that shows each
default, the presets and the docstring's examples as written; a log that starts with the untrained network's
k-NN (epoch 0); a finished run that says where its checkpoint is and what to run next; one line, not a
traceback, for a truncated checkpoint, a finished run resumed, a patch size that does not tile the image, and
Ctrl-C; no empty run folder left by a start that failed. Each test names the bug it catches."""
import argparse
import importlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import eval_linear
import vit
from common import ROOT, read_log

METHODS = [m for m in ("simclr", "moco", "byol", "swav", "dino") if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
TINY = ["--dataset", "folder", "--arch", "vit_mini", "--patch-size", "8", "--img-size", "16", "--batch-size", "32",
        "--warmup-epochs", "0", "--workers", "0", "--device", "cpu"]


def method_argv(method, tiny_data, out, epochs=1, knn_every=1):
    extra = ["--small-crop-size", "8", "--num-small-crops", "2"] if method in ("swav", "dino") else []
    return [*TINY, *extra, "--data-dir", tiny_data, "--epochs", str(epochs), "--knn-every", str(knn_every),
            "--out", str(out)]


@pytest.mark.parametrize("method", METHODS)
def test_help_shows_every_default_the_presets_and_the_examples_as_written(method):
    """Catches an option whose default --help does not show (argparse's plain formatter), a docstring whose
    `\\`-continued example lines print joined into one (a docstring that is not raw), and --arch without the
    presets' sizes."""
    module = importlib.import_module(method)
    parser = module.get_args_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps help lines: compare with whitespace collapsed
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and action.default is not argparse.SUPPRESS:
            assert f"(default: {action.default})" in text, (action.option_strings, action.default)
    continued = [line for line in module.__doc__.splitlines() if line.endswith("\\")]
    assert continued, f"{method}.py's docstring has no multi-line example any more: this test checks nothing"
    for line in continued:
        assert line + "\n" in parser.format_help(), line
    assert vit.describe_presets() in parser.format_help().replace("\n", " ") or all(
        f"{name} (width" in text for name in vit.PRESETS)


def test_preset_descriptions_count_the_real_parameters():
    """Catches --help's parameter counts drifting from the networks they describe (a wrong formula, a preset
    changed in one place only)."""
    for patch in (4, 8):
        described = dict(re.findall(r"(vit_\w+) \(width .*?, ([\d.]+)M params", vit.describe_presets(patch)))
        for name, build in vit.ARCHS.items():
            n = sum(p.numel() for p in build(img_size=32, patch_size=patch).parameters() if p.requires_grad)
            assert described[name] == f"{n / 1e6:.1f}", (name, patch, n)


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
@pytest.mark.needs_dino
@pytest.mark.parametrize("method", METHODS)
def test_a_run_logs_the_untrained_knn_first_and_ends_saying_what_next(method, tiny_data, tmp_path, capsys):
    """Catches a log without the untrained network's k-NN (the baseline a newcomer reads the gain against), an
    epoch-0 line computed after training started, a run that ends without naming its checkpoint and the eval
    command, and --resume of a finished run that does not say so (or trains again)."""
    module = importlib.import_module(method)
    out = tmp_path / "run"
    argv = method_argv(method, tiny_data, out)
    module.main(argv)
    log = read_log(out, epoch0=True)
    assert [line["epoch"] for line in log] == [0, 1] and set(log[0]) == {"epoch", "knn_top1", "knn_queries"}
    assert log[0]["knn_queries"] == "test"
    # independently: the same ViT, built from the same seed as the script builds it, never trained
    torch.manual_seed(0)
    untrained = vit.ARCHS["vit_mini"](img_size=16, patch_size=8)
    tf = data.eval_transform(16, *data.MEAN_STD["folder"])
    loaders = [data.build_loader(data.build_dataset("folder", tiny_data, split, tf), 256, 0, train=False)
               for split in ("train", "test")]
    assert log[0]["knn_top1"] == pytest.approx(eval_linear.knn_eval(untrained, *loaders, torch.device("cpu")))
    printed = capsys.readouterr().out
    ckpt = os.path.join(out, "checkpoint.pt")
    assert f"done: {ckpt}" in printed and f"python eval_linear.py --ckpt {ckpt} --random-init" in printed
    before = os.stat(ckpt).st_mtime_ns
    module.main(argv + ["--resume"])
    assert "has finished its 1 epochs: nothing to train" in capsys.readouterr().out
    assert os.stat(ckpt).st_mtime_ns == before and len(read_log(out, epoch0=True)) == 2

    # a truncated checkpoint (a full disk, a copy cut short): one line naming it
    with open(ckpt, "rb") as f:
        head = f.read(1000)
    with open(ckpt, "wb") as f:
        f.write(head)
    with pytest.raises(SystemExit) as e:
        module.main(argv + ["--resume"])
    assert str(e.value).startswith(f"{ckpt}: not a checkpoint readable") and "\n" not in str(e.value)


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
@pytest.mark.needs_dino
@pytest.mark.parametrize("method", METHODS)
def test_val_fraction_scores_the_monitor_on_train_images_held_out_of_its_bank(method, tiny_data, tmp_path):
    """Catches a script whose --val-fraction does not reach its k-NN monitor (which then reads the test split, the
    one every choice must not be made on) or whose log does not say which split the k-NN was scored on."""
    out = tmp_path / "run"
    importlib.import_module(method).main(method_argv(method, tiny_data, out) + ["--val-fraction", "0.2"])
    log = read_log(out, epoch0=True)
    assert log[0]["knn_queries"] == "val (0.2 of train)"
    torch.manual_seed(0)  # independently: the untrained ViT on the train split cut by stratified_split
    untrained = vit.ARCHS["vit_mini"](img_size=16, patch_size=8)
    train = data.build_dataset("folder", tiny_data, "train", data.eval_transform(16, *data.MEAN_STD["folder"]))
    bank_idx, val_idx = eval_linear.stratified_split(train.targets, 0.2)
    loaders = [data.build_loader(torch.utils.data.Subset(train, idx), 256, 0, train=False)
               for idx in (bank_idx, val_idx)]
    assert log[0]["knn_top1"] == pytest.approx(eval_linear.knn_eval(untrained, *loaders, torch.device("cpu")))


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
@pytest.mark.needs_dino
@pytest.mark.parametrize("method", METHODS)
def test_the_log_says_how_often_the_gradient_clip_acted(method, tiny_data, tmp_path, monkeypatch):
    """Catches a grad_norm logged after clipping (it would never exceed --clip-grad), a mean or max over the wrong
    steps, and a `clipped` fraction that does not count the steps whose norm was above the threshold."""
    # the real clip, reporting scripted norms (200 images at batch 32: 6 steps), half of them above --clip-grad
    scripted, clip = [0.25, 4.0, 0.5, 1.0, 0.125, 2.0], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clip(*a, **k) * 0 + scripted.pop(0))
    out = tmp_path / "run"
    importlib.import_module(method).main(method_argv(method, tiny_data, out, epochs=1, knn_every=0)
                                         + ["--clip-grad", "0.5"])
    line = read_log(out)[0]
    assert not scripted and line["grad_norm"] == pytest.approx(7.875 / 6) and line["grad_norm_max"] == 4.0
    assert line["clipped"] == 0.5  # 4.0, 1.0 and 2.0 are above 0.5; 0.5 itself is not clipped


@pytest.mark.needs_simclr_aug
@pytest.mark.parametrize("method", METHODS)
def test_a_start_that_fails_leaves_no_run_folder(method, tmp_path):
    """Catches runs/<name> created before the data is known to load, left empty by the error."""
    module = importlib.import_module(method)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="does not exist"):
        module.main(method_argv(method, str(tmp_path / "no_such_data"), out))
    assert not out.exists()


def test_eval_linear_says_in_one_line_when_the_patches_do_not_tile_the_image(tmp_path):
    """Catches a ValueError traceback from inside the model when --img-size is not a multiple of the patch size,
    for --random-init and for a checkpoint."""
    common = ["--dataset", "folder", "--data-dir", str(tmp_path), "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"^--img-size 20 is not a multiple of --patch-size 8$"):
        eval_linear.main(["--random-init", "--arch", "vit_mini", "--patch-size", "8", "--img-size", "20", *common])
    path = tmp_path / "vit.pt"
    backbone = vit.vit_mini(img_size=32, patch_size=8)
    torch.save({"method": "simclr", "epoch": 1, "args": {}, "vit_kwargs": backbone.kwargs,
                "backbone": backbone.state_dict()}, path)
    with pytest.raises(SystemExit, match=r"^--img-size 36 is not a multiple of the patch size 8 of simclr") as e:
        eval_linear.main(["--ckpt", str(path), "--img-size", "36", *common])
    assert "\n" not in str(e.value)


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
def test_ctrl_c_prints_one_line_saying_how_to_resume(tiny_data, tmp_path):
    """Catches Ctrl-C ending a run with a traceback (from wherever the loop was) instead of one line that says
    the checkpoint holds the last finished epoch and how to continue."""
    out = tmp_path / "run"
    cmd = [sys.executable, "simclr.py", *method_argv("simclr", tiny_data, out, epochs=1000, knn_every=0)]
    # SIGINT back to its default in the child: a shell's background job (CI may be one) starts with it ignored,
    # and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").exists(), "no epoch finished within 2 minutes"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last == (f"interrupted: {out / 'checkpoint.pt'} holds the last finished epoch; run the same command "
                    f"with --resume to continue"), last


@pytest.mark.parametrize("bf16", [True, False])
def test_precision_auto_is_bf16_where_the_gpu_has_it_else_fp16(bf16, monkeypatch, capsys):
    """Catches a T4 (Colab's free GPU, no bf16) given bf16 autocast, which it runs slowly or not at all, instead
    of fp16 with the gradient scaler; an explicit --precision overridden; autocast asked for off CUDA; and a
    method file whose default is not auto."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)  # the capability query
    cuda = torch.device("cuda", 0)
    assert eval_linear.resolve_precision("auto", cuda, announce=True) == ("bf16" if bf16 else "fp16")
    said = capsys.readouterr().out
    assert said.startswith("precision: bf16 autocast (this GPU has bf16)" if bf16 else
                           "precision: fp16 autocast with a gradient scaler (this GPU has no bf16)"), said
    assert [eval_linear.resolve_precision(p, cuda) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    assert eval_linear.resolve_precision("auto", torch.device("cpu")) == "fp32"
    for method in METHODS:
        assert importlib.import_module(method).get_args_parser().get_default("precision") == "auto", method


def test_the_small_crop_is_the_papers_share_of_the_image_on_the_patch_grid():
    """Catches a default small crop that ignores --img-size (16 px whatever the image: 1/6 of a 96 px side instead of
    the paper's 96/224 = 0.43), that is not a multiple of the patch, or that is fewer than 4x4 patches (the paper's
    96 px crops are 6x6 patches of 16). Expected values by hand: 224 * 0.43 = 96 = 6 x 16; 96 * 0.43 = 41.1, 5
    patches of 8; 32 * 0.43 = 13.7, 3 patches of 4 raised to 4; 64 * 0.43 = 27.4, 3 patches of 8 raised to 4."""
    cases = {(224, 16): 96, (96, 8): 40, (32, 4): 16, (32, 8): 32, (64, 8): 32, (448, 16): 192}
    assert {k: data.small_crop_side(*k) for k in cases} == cases


@pytest.mark.parametrize("method, paper", [("swav", 6), ("dino", 8)])
def test_small_crops_by_default_only_where_they_are_4x4_patches_and_small(method, paper, tiny_data, tmp_path,
                                                                          monkeypatch, capsys):
    """Catches the papers' small crops by default on a grid too coarse for them (vit_mini/8's 16 px crops are 2x2
    patches: they cost SwAV 3.5 k-NN points in the README's CPU protocol) or as large as the image (vit_mini/8's
    4x4-patch crop at 32 px is the whole image), none where they are 4x4 patches and at most half the side
    (ViT-Tiny/4's 16 px crops, the files' default arch), an explicit --num-small-crops overruled, or a run that
    does not say it dropped them."""
    if method not in METHODS:
        pytest.skip(f"{method}.py is not here")
    module = importlib.import_module(method)
    sizes = ((16, 32, 8), (16, 32, 4), (24, 32, 8), (32, 32, 8), (32, 64, 8), (12, 32, 4), (20, 32, 4), (40, 96, 8))
    assert [module.default_small_crops(*s) for s in sizes] == [0, paper, 0, 0, paper, 0, 0, paper]

    class Stop(Exception):
        pass

    views = []
    monkeypatch.setattr(data, "build_train_loader", lambda dataset, specs, *a, **k: views.append(
        (len(specs), specs[-1].size)) or (_ for _ in ()).throw(Stop()))
    argv = [*TINY, "--data-dir", tiny_data, "--img-size", "32", "--out", str(tmp_path)]
    for extra in (["--small-crop-size", "16"], ["--small-crop-size", "16", "--num-small-crops", "3"],
                  ["--patch-size", "4"], []):
        with pytest.raises(Stop):
            module.main(argv + extra)
    assert views == [(2, 32), (5, 16), (2 + paper, 16), (2, 32)]
    out = capsys.readouterr().out
    assert out.count("note: no small crops: a 16 px crop would be 2x2 patches of 8 px") == 1
    assert out.count("note: no small crops: a 32 px crop would be more than half of the 32 px global crop") == 1
