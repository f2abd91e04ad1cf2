"""benchmarks/study.py end to end on the shipped CIFAR-10 sample with one- and two-step runs (vit_mini/8 at
16 px): every method and both baselines get a row with every column; the table carries its protocol lines;
the numbers are eval_linear's (its CLI gives the same on a row's recorded command); a second invocation
retrains and re-evaluates nothing; a stopped run is continued with --resume, not restarted; the figures exist
and are small; the dry run writes nothing; a checkpoint of other settings is refused; the pretraining subset is
a fixed stratified one and the five unseen classes are disjoint from the five seen. Each test names the bug it
catches."""
import importlib.util
import io
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import types
import zipfile

import pytest
import torch
from PIL import Image

import data
import eval_linear
import vit
from common import ROOT, SAMPLE, small_folder

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import study  # noqa: E402
import tinyimagenet20  # noqa: E402

# One step of batch 64 on the 5 x 13 seen-class images, two on the 10 x 13 of all classes; k-NN monitor every epoch.
# One seed; the fine-tuning on the transfer set one epoch.
TINY = ["--dataset", "folder", "--data-dir", SAMPLE, "--arch", "vit_mini", "--patch-size", "8", "--img-size", "16", "--epochs", "1",
        "--batch-size", "64", "--subset-per-class", "13", "--workers", "0", "--knn-every", "1", "--seeds", "1",
        "--transfer-finetune-epochs", "1"]
METHODS = [m for m in study.METHODS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip()]


def with_flag(argv, flag, value):
    """argv with the value after `flag` replaced."""
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def mtimes(out):
    runs = os.path.join(out, "runs")
    return {r: os.stat(os.path.join(runs, r, "checkpoint.pt")).st_mtime_ns for r in sorted(os.listdir(runs))}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One complete study: the sample, 13 images per class, one epoch, a 20/10-per-class transfer folder."""
    tmp = tmp_path_factory.mktemp("study")
    transfer = small_folder(tmp / "transfer", train_per_class=20, test_per_class=10)
    out = str(tmp / "out")
    argv = [*TINY, "--transfer-dir", transfer, "--out", out]
    table = study.main(argv)
    return {"out": out, "argv": argv, "table": table, "transfer": transfer}


def table_cells(table):
    """{row label: [cells]} of the first markdown table (the reading's letter table comes later)."""
    lines = table.split("\n\n")[0].splitlines()
    lines = [s for s in lines if s.startswith("| ") and not s.startswith("|  |")]
    return {c[0]: c[1:] for c in ([x.strip() for x in s.strip("|").split("|")] for s in lines)}


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_every_network_has_every_column(done):
    """Catches a method or baseline that drops out of the table, or a column left empty (an evaluation skipped,
    a results row the table does not find)."""
    cells = table_cells(done["table"])
    labels = ["random init", "supervised", *[study.LABELS[m] for m in METHODS]]
    assert list(cells) == labels, cells
    for label, row in cells.items():
        assert len(row) == len(study.COLUMNS) and "-" not in row, (label, row)
        for acc in row[:10]:
            if not (label == "supervised" and acc is row[2]):  # its CIFAR-10 fine-tune is random init's
                assert 0 <= float(acc) <= 100, (label, acc)
        if label != "random init":
            # images/s of its training ('busy': measured while the machine ran other jobs)
            assert float(row[12].removesuffix(" (busy)")) > 0, (label, row)
            assert row[11].endswith((" s", " min")), (label, row)  # its CPU time, recorded
    assert cells["supervised"][2] == "—"
    # random init fine-tuned with the labels is the supervised baseline: the same number, not a second training
    sup = next(r for r in read_jsonl(os.path.join(done["out"], "results.jsonl"))
               if r["run"] == "supervised_s0" and r.get("eval") == "cifar10")
    assert cells["random init"][2] == f"{sup['finetune_top1']:.1f}"
    rows = read_jsonl(os.path.join(done["out"], "results.jsonl"))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert all(r["command"].startswith("python eval_linear.py ") for r in evals)
    # 1% of the sample's 100 train images per class: one per class; 10%: ten
    main = [r for r in evals if r["eval"] == "cifar10"]
    assert {(r["num_0.01"], r["num_0.1"], r["num_train"], r["num_test"]) for r in main} == {(10, 100, 1000, 1000)}
    tuned = {(r["run"], r["eval"]): r for r in evals if r["eval"] in ("finetune", "finetune_transfer")}
    assert set(tuned) == {*((f"{m}_s0", "finetune") for m in METHODS),
                          *((f"{m}_s0", "finetune_transfer") for m in ["random", "supervised", *METHODS])}
    # on the pretraining images (2 steps of 64 of the 130), on the transfer set's 200 (3 steps of 64)
    assert {r["images_per_epoch"] for (_, e), r in tuned.items() if e == "finetune"} == {128}
    assert {(r["images_per_epoch"], r["num_test"]) for (_, e), r in tuned.items() if e == "finetune_transfer"} == {
        (192, 100)}
    unseen = [r for r in evals if r["eval"] == "unseen"]
    assert {(r["num_classes"], r["num_test"]) for r in unseen} == {(5, 500)} and len(unseen) == 2 + len(METHODS)
    pre = {r["run"]: r for r in rows if r["kind"] == "pretrain"}
    for m in METHODS:
        assert f"python {m}.py --dataset folder" in pre[f"{m}_s0"]["command"] and pre[f"{m}_s0"]["seconds"] > 0
        # the child's CPU time (it imports torch and trains: over half a second anywhere), this machine's CPU
        assert pre[f"{m}_s0"]["cpu_seconds"] > 0.5 and pre[f"{m}_s0"]["cpu"] == study.cpu_model()
        assert pre[f"{m}5_s0"]["num_images"] == 65 and pre[f"{m}_s0"]["num_images"] == 130


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_table_states_each_protocol_once(done):
    """Catches a table whose numbers lose the protocol that produced them (data, epochs, probe, subsets)."""
    text = open(os.path.join(done["out"], "table.md")).read()
    assert text == done["table"]
    for line in ("- **Pretraining** (every row): vit_mini/8 at 16 px",
                 "13 per class, a fixed stratified subset (130 images), 1 epoch,",
                 "- **CIFAR-10 k-NN / linear** (pretraining effect): frozen CLS features of all 1,000 train images",
                 "k-NN k=20, T=0.07", "- **1% / 10% labels** (label efficiency)", "(10 / 100 images",
                 "- **Unseen classes**: every network trained again on airplane, automobile, bird, cat, deer only",
                 "(dog, frog, horse, ship, truck)", "65 of their train images (the same 13 per class)",
                 "- **Transfer**: the CIFAR-10 networks, frozen, on transfer (200 train / 100 test",
                 "- **Cost** (training on all classes): *pretraining time*", "- **Baselines**: *random init*",
                 "- **Fine-tune**: every network and a new linear head trained end to end",
                 "the supervised baseline's budget (1 epoch, batch 64); random init's is the supervised baseline",
                 "Transfer: on transfer's train images, 1 epoch of 192 images (the loader drops the last partial batch).", "One seed.",
                 "Command: `python benchmarks/study.py", "Hardware, as each training run recorded it: "):
        assert text.count(line) == 1, line


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_numbers_are_eval_linears(done):
    """Catches a study whose in-process evaluation drifts from eval_linear's CLI (another normalization, image
    size, k-NN setting, probe or fine-tuning seed, lr or epochs): the row's recorded command must print the same
    k-NN and linear top-1, or the same fine-tune top-1. On the transfer rows (small, and where the pretraining
    normalization matters), a method's and random init's; a method's fine-tune on its pretraining images; and a
    method's 10%-labels probe (its --label-fraction command)."""
    rows = [r for r in read_jsonl(os.path.join(done["out"], "results.jsonl")) if r["kind"] == "eval" and (
        r["eval"], r["run"]) in {("transfer", "byol_s0"), ("transfer", "random_s0"), ("finetune", "simclr_s0"),
                                 ("finetune_transfer", "random_s0")}]
    assert len(rows) == 4
    for r in rows:
        argv = shlex.split(r["command"])[2:]
        cwd = os.getcwd()
        os.chdir(ROOT)  # the commands are written to run from the repository root
        try:
            (cli,) = eval_linear.main(argv + ["--workers", "0"])
        finally:
            os.chdir(cwd)
        if r["eval"].startswith("finetune"):  # the same network trained the same way
            assert cli["finetune_top1"] == pytest.approx(r["finetune_top1"], abs=1e-6), r["command"]
        else:
            assert (cli["knn_top1"], cli["linear_top1"]) == pytest.approx((r["knn_top1"], r["linear_top1"]), abs=1e-6)
    # the 10% labels column: eval_linear --label-fraction draws the same labelled images and probes them alone
    (r,) = [r for r in read_jsonl(os.path.join(done["out"], "results.jsonl")) if r.get("eval") == "cifar10" and
            r["run"] == "simclr_s0"]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        (cli,) = eval_linear.main(shlex.split(r["command_linear_0.1"])[2:] + ["--workers", "0"])
    finally:
        os.chdir(cwd)
    assert (cli["num_train"], cli["linear_top1"]) == (r["num_0.1"], pytest.approx(r["linear_0.1_top1"], abs=1e-6))


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_figures_exist_and_are_small(done):
    """Catches a figure that is not drawn (a plot crashing on one-epoch logs) or grows past a README-sized PNG."""
    if not HAVE_MATPLOTLIB:
        pytest.skip("matplotlib is not installed (requirements-dev.txt has it)")
    names = ["curves", "attention", "attention_heads", "pca", "seeds"] + [f"views_{m}" for m in METHODS]
    for name in names:
        path = os.path.join(done["out"], "figures", f"{name}.png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(path) < 200_000, name


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_second_invocation_redoes_nothing(done, capsys):
    """Catches a study that retrains or re-evaluates finished runs (a killed hour-long study must not start over)."""
    before, rows = mtimes(done["out"]), read_jsonl(os.path.join(done["out"], "results.jsonl"))
    table = study.main([*done["argv"], "--no-figures"])
    out = capsys.readouterr().out
    assert mtimes(done["out"]) == before
    assert read_jsonl(os.path.join(done["out"], "results.jsonl")) == rows
    assert table.split("Hardware:")[0] == done["table"].split("Hardware:")[0]  # the load average may differ
    for m in METHODS:
        assert f"[study] {m}_s0: complete (1/1 epochs), skipped" in out
    assert "[study] supervised_s0: complete (1 epoch), skipped" in out
    # random init: 4 evaluations (k-NN / linear on CIFAR-10, transfer, unseen; the transfer fine-tune);
    # supervised: 3 + 1 (its five-class network); every method: 4 (+ its CIFAR-10 fine-tune) + 1
    assert out.count("in results.jsonl, skipped") == 8 + 5 * len(METHODS)


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_checkpoint_of_other_settings_is_refused(done):
    """Catches a study that skips (or resumes) a run trained with another batch size: a wrong number in the table."""
    with pytest.raises(SystemExit, match="is of another study: batch_size 64 \\(study: 32\\)"):
        study.main([*with_flag(done["argv"], "--batch-size", "32"), "--dry-run"])


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_rows_without_their_checkpoints_keep_their_cells(done, tmp_path, capsys, monkeypatch):
    """Catches a study that retrains (or drops from its table) the networks whose checkpoints are gone but whose
    rows are all in results.jsonl (deleted to free the disk, or the file carried to another machine), one that
    keeps a network missing a row (one evaluation's) instead of training it again, and one that keeps rows whose
    commands are not the ones it would run now (another --epochs). The study folder is restored afterwards."""
    out, results = done["out"], os.path.join(done["out"], "results.jsonl")
    rows = read_jsonl(results)
    plan = study.make_plan(study.get_args_parser().parse_args(done["argv"]))
    original, _ = study.table_rows(plan, rows)
    trained = []
    monkeypatch.setattr(study, "pretrain", lambda model, cfg, dry_run: trained.append(model["name"]) or True)
    monkeypatch.setattr(study, "random_init", lambda model, cfg, dry_run: trained.append(model["name"]) or True)
    monkeypatch.setattr(study, "supervised", lambda model, cfg, device, dry_run: trained.append(model["name"]) or True)
    moved = {m["ckpt"]: str(tmp_path / f"{m['name']}.pt") for m in plan["models"]}
    shutil.copy(results, tmp_path / "results.jsonl")
    try:
        for ckpt, aside in moved.items():
            os.replace(ckpt, aside)
        with open(results, "w") as f:  # every row but MoCo's transfer evaluation
            f.writelines(json.dumps(r) + "\n" for r in rows if (r["run"], r.get("eval")) != ("moco_s0", "transfer"))
        study.main([*done["argv"], "--dry-run"])
        printed = capsys.readouterr().out
        assert trained == ["moco_s0"]  # the one network with a row missing
        assert all(f"[study] {m['name']}: no checkpoint, but every row it needs is in results.jsonl: kept" in printed
                   for m in plan["models"] if m["name"] != "moco_s0")
        cells, _ = study.table_rows(plan, read_jsonl(results))
        assert {k: v for k, v in cells.items() if k != "moco"} == {k: v for k, v in original.items() if k != "moco"}
        assert cells["moco"][:5] == ["-"] * 5 and "-" not in original["moco"][:5]
        trained.clear()  # rows of other commands are not this study's: with --epochs 2 only the untrained ViT's are
        study.main([*with_flag(done["argv"], "--epochs", "2"), "--dry-run"])
        assert capsys.readouterr().out.count("no checkpoint, but") == 1
        assert sorted(trained) == sorted(m["name"] for m in plan["models"] if m["model"] != "random")
    finally:
        for ckpt, aside in moved.items():
            if os.path.exists(aside):
                os.replace(aside, ckpt)
        shutil.copy(tmp_path / "results.jsonl", results)
    assert study.table_rows(plan, read_jsonl(results))[0] == original


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
@pytest.mark.needs_moco
@pytest.mark.needs_byol
@pytest.mark.needs_swav_sinkhorn
@pytest.mark.needs_swav_loss
def test_a_stopped_run_is_resumed(done, capsys):
    """Catches a partial checkpoint that is retrained from scratch (or skipped as if complete) instead of continued
    with the method's --resume, and a table that keeps showing the numbers of the old checkpoint. (The last test to
    use the study folder: its simclr run is then at epoch 2.)"""
    out = done["out"]
    simclr = os.path.join(out, "runs", "simclr_s0")
    first = read_jsonl(os.path.join(simclr, "log.jsonl"))
    before = mtimes(out)
    # epoch 1 of now 2 epochs: what a study stopped after its first epoch leaves
    plan = study.make_plan(study.get_args_parser().parse_args(with_flag(done["argv"], "--epochs", "2")))
    model = next(m for m in plan["models"] if m["name"] == "simclr_s0")
    assert study.pretrain(model, plan["cfg"], dry_run=False)
    printed = capsys.readouterr().out
    assert "[study] simclr_s0: resuming after epoch 1 of 2" in printed and printed.rstrip().endswith("--resume")
    log = read_jsonl(os.path.join(simclr, "log.jsonl"))
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[:2] == first[:2]  # continued, not restarted
    assert torch.load(os.path.join(simclr, "checkpoint.pt"), weights_only=True, mmap=True)["epoch"] == 2
    assert {r: t for r, t in mtimes(out).items() if r != "simclr_s0"} == {r: t for r, t in before.items()
                                                                          if r != "simclr_s0"}
    # the results of the epoch-1 checkpoint no longer count: the study evaluates the new one, the table waits for it
    cells, _ = study.table_rows(plan, read_jsonl(os.path.join(out, "results.jsonl")))
    assert cells["simclr"][:5] == ["-"] * 5 and "-" not in cells["moco"][:5]


def test_dry_run_prints_the_protocol_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """Catches a protocol dict that does not reach the commands, a dry run with side effects, or a study that
    stops on a method file that does not exist yet (it should run without it, with a note)."""
    out = tmp_path / "dry"
    dry = ["--protocol", "cpu", "--dataset", "folder", "--data-dir", SAMPLE, "--transfer-dir", SAMPLE, "--out", str(out), "--dry-run"]
    study.main(dry)
    printed = capsys.readouterr().out
    cpu = study.PROTOCOLS["cpu"]
    assert not out.exists()
    for m in METHODS:
        for flags in (f"python {m}.py --dataset folder", "--arch vit_mini --patch-size 8",
                      f"--epochs {cpu['epochs']} --batch-size {cpu['batch_size']}", f"{m}_s0"):
            assert flags in printed, (m, flags)
        assert f"[study] {m}5_s0: python {m}.py" in printed
    assert cpu["archs"] == ["vit_mini/8"] and cpu["seeds"] == 3 and cpu["unseen_seeds"] == 1
    assert "eval_linear.py --random-init --arch vit_mini --patch-size 8 --img-size 32" in printed
    assert f"--finetune --finetune-epochs {cpu['epochs']} --finetune-lr {cpu['finetune_lr']:g}" in printed
    # three seeds, each its own subset draw; the five-class runs for seed 0 only
    for seed in (1, 2):
        tree = study.shown(str(out / "data" / f"train_1000pc_s{seed}"))  # (relative where the repo's folder is near)
        assert f"--data-dir {tree} " in printed and f"simclr_s{seed}:" in printed
    assert "simclr5_s0:" in printed and "simclr5_s1" not in printed
    # a repository without swav.py (yet): the other methods run, swav is named in a note
    repo = tmp_path / "repo"
    repo.mkdir()
    for m in ("simclr", "moco", "byol"):
        (repo / f"{m}.py").write_text("")
    monkeypatch.setattr(study, "ROOT", str(repo))
    study.main(dry)
    printed = capsys.readouterr().out
    assert "note: swav.py does not exist (yet)" in printed and "swav_s0" not in printed and "byol_s0" in printed


def test_subsets_are_fixed_stratified_and_the_class_split_disjoint(tmp_path):
    """Catches a pretraining subset that changes between invocations (a resumed run would see other images) or
    is not stratified, and seen / unseen class trees that share a class."""
    classes = sorted(os.listdir(os.path.join(SAMPLE, "train")))
    a = study.build_tree(str(tmp_path / "a"), SAMPLE, classes, 7)
    b = study.build_tree(str(tmp_path / "b"), SAMPLE, classes, 7)
    files_a, files_b = study.class_files(a, "train"), study.class_files(b, "train")
    assert files_a == files_b and {len(f) for f in files_a.values()} == {7} and list(files_a) == classes
    assert study.class_files(a, "test") == study.class_files(SAMPLE, "test")  # all test images
    for c, fs in files_a.items():  # symlinks to the sample's own files
        for f in fs:
            target = os.path.realpath(os.path.join(SAMPLE, "train", c, f))
            assert os.path.realpath(os.path.join(a, "train", c, f)) == target
    seen = study.build_tree(str(tmp_path / "seen"), SAMPLE, classes[:5], 7)
    unseen = study.build_tree(str(tmp_path / "unseen"), SAMPLE, classes[5:], 0)
    assert set(study.class_files(seen, "train")).isdisjoint(study.class_files(unseen, "train"))
    assert study.class_files(unseen, "train") == {c: study.class_files(SAMPLE, "train")[c] for c in classes[5:]}
    with pytest.raises(SystemExit, match="built from other data"):
        study.build_tree(str(tmp_path / "a"), SAMPLE, classes, 8)


def test_mean_and_sample_std_over_seeds():
    """Catches the population std (n) instead of the sample std (n - 1), or a mean over missing values."""
    assert study.mean_std([70.0, 72.0, 74.0]) == "72.0 ± 2.0"
    assert study.mean_std([44.41]) == "44.4" and study.mean_std([]) == "-" and study.mean_std([None, 3.0]) == "3.0"


def test_t_pvalue_is_students():
    """Catches a wrong p-value of the t distribution (a one-sided p, a wrong incomplete beta, the continued fraction
    stopped early): against the closed forms at 1 and 2 degrees of freedom (P(|T| >= t) = 1 - 2 atan(t) / pi and
    1 - t / sqrt(2 + t²)), the normal limit, and scipy where it is installed."""
    for t in (0.0, 0.3, 1.0, 2.5, 4.303, 12.706, 16.52, 43.4, 1e4):
        assert study.t_pvalue(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9, abs=1e-13)
        assert study.t_pvalue(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9, abs=1e-13)
        assert study.t_pvalue(-t, 2) == study.t_pvalue(t, 2)
    # the tables' two-sided 5% points: 12.706 (1), 4.303 (2), 2.228 (10); df -> infinity: the normal's 1.960
    for t, df in ((12.706, 1), (4.303, 2), (2.228, 10), (1.95996, 10 ** 7)):
        assert study.t_pvalue(t, df) == pytest.approx(0.05, abs=2e-5)
    assert study.t_pvalue(math.inf, 2) == 0.0
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 9, 30):
        for t in (0.1, 0.9, 2.0, 3.5, 8.0, 25.0):
            assert study.t_pvalue(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-8)


def test_paired_differences_over_seeds():
    """Catches a comparison that is not paired (the seed-to-seed swing both networks share hides a steady
    difference), an unsigned t, or a p-value from one seed."""
    swing = {0: 30.0, 1: 36.0, 2: 33.0}  # the subsets differ more than the two networks do
    a = {s: v + 1.0 + 0.1 * s for s, v in swing.items()}  # 1.0, 1.1, 1.2 above: every seed, small spread
    m, sd, t, p = study.paired(a, swing)
    # t = 1.1 / (0.1 / sqrt 3) = 19.05 on 2 degrees of freedom
    assert (m, sd, t) == (pytest.approx(1.1), pytest.approx(0.1), pytest.approx(11 * math.sqrt(3)))
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert study.paired(swing, a)[2] == pytest.approx(-t) and study.paired(swing, a)[3] == pytest.approx(p)
    b = {0: 31.0, 1: 35.5, 2: 34.0}  # +1, -0.5, +1: t = 0.5 / (0.866 / sqrt 3) = 1.0
    assert study.paired(b, swing)[2] == pytest.approx(1.0)
    assert study.paired({0: 40.0}, {0: 30.0}) == (10.0, None, None, None)  # one seed says nothing about noise
    assert study.paired({0: 31.0, 1: 31.0}, {0: 30.0, 1: 30.0})[2:] == (math.inf, 0.0)  # no spread at all
    assert study.paired({0: 30.0, 1: 31.0, 5: 99.0}, {0: 30.0, 1: 30.0})[0] == 0.5  # the seeds both have


def test_holm_is_the_step_down_procedure():
    """Catches a Bonferroni (m x p for every p), an adjustment that is not monotone in p (a pair shown while a
    smaller p is not), or the step order reversed (Hochberg's step-up): Holm's adjusted p below alpha must reject
    exactly what the sequential procedure rejects at that alpha: H_(1), H_(2), ... while p_(k) <= alpha / (m-k+1)."""
    def sequential(ps, alpha):
        order, rejected = sorted(range(len(ps)), key=lambda i: ps[i]), set()
        for k, i in enumerate(order):
            if ps[i] > alpha / (len(ps) - k):
                break
            rejected.add(i)
        return rejected

    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        m = int(torch.randint(1, 25, (1,), generator=gen))
        ps = (torch.rand(m, generator=gen) ** 3 * 0.2).tolist()  # many small p-values, some ties near 0
        adjusted = study.holm(ps)
        for alpha in (0.01, 0.05, 0.1):
            assert {i for i, q in enumerate(adjusted) if q <= alpha} == sequential(ps, alpha), (ps, alpha)
    assert study.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x 0.01; 2 x 0.03; max(.06, .04)


def test_letters_share_a_letter_exactly_when_not_shown_to_differ():
    """Catches a compact letter display that gives two networks shown to differ a common letter, or two not shown
    to differ none (the display would imply an untested ordering), on random sets of differing pairs."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        names = [f"n{i}" for i in range(int(torch.randint(2, 8, (1,), generator=gen)))]
        pairs = [frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1:]]
        differ = {p for p in pairs if torch.rand(1, generator=gen) < 0.5}
        shown = study.letters(names, differ)
        for p in pairs:
            a, b = tuple(p)
            assert bool(set(shown[a]) & set(shown[b])) == (p not in differ), (names, differ, shown)
    assert study.letters(["x", "y", "z"], {frozenset(("x", "z"))}) == {"x": "a", "y": "ab", "z": "b"}
    assert study.letters(["x", "y"], set()) == {"x": "a", "y": "a"}


def test_reading_claims_only_what_the_corrected_tests_support():
    """Catches a reading that ranks by mean alone, chains neighbours (implying a test that was not made), forgets
    the multiple-comparison correction, or lists a method above a baseline that the test does not put there; and
    one that calls random init's CIFAR-10 fine-tune anything but the supervised baseline."""
    seeds = lambda *v: dict(enumerate(v))  # noqa: E731
    values = {"random": {k: seeds(30, 31, 29) for k in study.HEADLINE},
              "supervised": {k: {} if k == "finetune" else seeds(34, 35, 33) for k in study.HEADLINE},
              # +8.0, +7.5, +8.0 over random init: t = 7.83 / (0.289 / sqrt 3) = 47, p = 0.00045, Holm x6: 0.003
              "simclr": {k: seeds(38, 38.5, 37) for k in study.HEADLINE},
              # +0.5, +0.2, +0.9 over random init: t = 2.6, p = 0.12: not shown, though every seed is above
              "dino": {k: seeds(30.5, 31.2, 29.9) for k in study.HEADLINE}}
    lines = study.reading({"methods": ["simclr", "dino"]}, values)
    assert "Holm's step-down correction over the column's 3 or 6 pairs" in lines[0]
    # 2 df, p = 0.05 / 6: 1 - t / sqrt(2 + t²) = 0.05 / 6 at t = 10.9
    assert "Holm's first step needs |t| > 10.9 (p < 0.0083)" in lines[0]
    table = lines[lines.index("") + 1:]
    assert table[2:6] == ["| random init | 30.0 c | 30.0 c | 30.0 b | 30.0 c | 30.0 c | 30.0 c |",
                          "| supervised | 34.0 b | 34.0 b | — | 34.0 b | 34.0 b | 34.0 b |",
                          "| SimCLR | 37.8 a | 37.8 a | 37.8 a | 37.8 a | 37.8 a | 37.8 a |",
                          "| DINO | 30.5 c | 30.5 c | 30.5 b | 30.5 c | 30.5 c | 30.5 c |"], table
    knn = next(s for s in lines if s.startswith("- CIFAR-10 k-NN"))
    p_dino = study.paired(values["dino"]["knn"], values["random"]["knn"])[3]
    assert p_dino > 0.05  # the case: every seed of DINO above random init, not shown
    assert knn.startswith("- CIFAR-10 k-NN (6 pairs): shown to differ: SimCLR > supervised (+3.8, t = ")
    assert " ≈ " not in knn and "DINO > random init" not in knn
    assert knn.endswith("Above random init: SimCLR; not shown: DINO. Above supervised: SimCLR; below: DINO.")
    fine = next(s for s in lines if s.startswith("- CIFAR-10 fine-tune"))
    assert fine.startswith("- CIFAR-10 fine-tune (3 pairs): shown to differ: SimCLR > DINO (+7.3, t = 63.2, ")
    assert "; SimCLR > random init (+7.8, t = 47.0, Holm p = 0.001)." in fine
    assert fine.endswith("Above random init (= supervised): SimCLR; not shown: DINO.")


def test_committed_reading_is_what_the_committed_rows_say():
    """Catches a docs/study.md reading that the rows of docs/study_results.jsonl do not give (edited by hand, or
    left behind when the statistics changed), a hardware line naming the machine that re-tabulated the rows
    instead of the one they record, and a t statistic that is not the audit's (issue 31: SimCLR vs
    MoCo v3 CIFAR-10 k-NN t = 16.5, SwAV vs BYOL 4.45, SimCLR vs MoCo v3 transfer k-NN 4.10, SimCLR vs BYOL
    CIFAR-10 fine-tune 1.27, DINO vs random init transfer fine-tune 0.25)."""
    rows = [r for r in read_jsonl(os.path.join(ROOT, "docs", "study_results.jsonl"))
            if r.get("protocol") != "few-label"]  # the few-label study's rows: the test after this one
    values = {m: {k: {} for k in study.HEADLINE} for m in ["random", "supervised", *study.METHODS]}
    for r in rows:
        for key, (kind, ev, field) in study.SOURCES.items():
            if key in study.HEADLINE and r["kind"] == kind and r.get("eval") == ev and r["part"] == "main":
                values[r["model"]][key][r["seed"]] = r[field]
        if r.get("eval") == "cifar10" and r["model"] == "supervised":  # random init's fine-tune: the baseline
            values["random"]["finetune"][r["seed"]] = r["finetune_top1"]
    t = lambda a, b, k: study.paired(values[a][k], values[b][k])[2]  # noqa: E731
    assert (round(t("simclr", "moco", "knn"), 1), round(t("swav", "byol", "knn"), 2)) == (16.5, 4.45)
    assert (round(t("simclr", "moco", "transfer_knn"), 2), round(t("simclr", "byol", "finetune"), 2)) == (4.10, 1.27)
    assert round(t("dino", "random", "transfer_finetune"), 2) == 0.25
    # 27 of the 60 method pairs (5 methods, 6 columns) at p < 0.05 before any correction, as the audit counted
    methods = study.METHODS
    uncorrected = [study.paired(values[a][k], values[b][k])[3] < 0.05 for k in study.HEADLINE
                   for i, a in enumerate(methods) for b in methods[i + 1:]]
    assert (len(uncorrected), sum(uncorrected)) == (60, 27)
    docs = open(os.path.join(ROOT, "docs", "study.md")).read()
    for line in study.reading({"methods": methods}, values):
        assert line in docs, line
    # where the rows say they ran (every one on the same 2-core Xeon), not where the table was written again
    trained = [r for r in rows if r["kind"] == "pretrain"]
    assert study.hardware_line(trained) == ("Hardware, as each training run recorded it: Intel(R) Xeon(R) Processor, "
                                            "2 cores; torch 2.14.1+cu130 (24 runs)")
    assert study.hardware_line(trained) in docs


def test_committed_few_label_table_is_what_the_committed_rows_say():
    """Catches a cell of the README's few-label table that its rows in docs/study_results.jsonl do not give (edited
    by hand, or left behind by a rerun): each cell's mean ± sample std over the seeds and its CPU hours recomputed
    here from the rows alone, with the statistics module (the recipe each search chose, the final runs of that
    recipe, the frozen features' k-NN and probe, the pretraining's CPU time), a label count without its three
    seeds, and docs/study.md showing another table than the README's."""
    rows = [r for r in read_jsonl(os.path.join(ROOT, "docs", "study_results.jsonl"))
            if r.get("protocol") == "few-label"]
    by_key = {r["key"]: r for r in rows}
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith("| labels | supervised from scratch |"))
    cells = table_cells("\n".join(lines[start:]))
    header = ["labels", *cells.pop("labels")]
    table = [[label, *row] for label, row in cells.items()]

    def cell(values, seconds):
        text = (f"{values[0]:.1f}" if len(values) == 1
                else f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
        return f"{text} · {seconds / 3600:.2f} h"

    def finals(trainer, task, seeds):
        if task == "cifar10":
            return [r for r in rows if r.get("stage") == "final" and r["trainer"] == trainer and r["task"] == task]
        recipe = by_key[f"recipe:{trainer}:{task}"]
        return [by_key[f"final:{trainer}:{task}:s{s}:lr{recipe['lr']:g}:{recipe['aug']}:ep{recipe['epochs']}"]
                for s in seeds]

    tasks = {"500 (1%)": "500", "5,000 (10%)": "5000", "50,000 (all)": "cifar10"}
    seen = []
    for line in table:
        task = tasks.get(line[0], "transfer" if line[0].startswith("transfer") else None)
        assert task, line[0]
        seen.append(task)
        seeds = [0] if task == "cifar10" else [0, 1, 2]
        sup = finals("supervised", task, seeds)
        assert len(sup) == len(seeds), line[0]
        assert line[1] == cell([r["top1"] for r in sup], statistics.mean(r["cpu_seconds"] for r in sup)), line[0]
        for col, text in zip(header[2:], line[2:], strict=True):
            label, how = col.split(" + ")
            method = {"SimCLR": "simclr", "SwAV": "swav"}[label]
            pre = by_key[f"pretrain:{method}"]["cpu_seconds"]
            if how == "fine-tune":
                tuned = finals(method, task, seeds)
                if task == "cifar10" and not tuned:
                    assert text == "not run"
                    continue
                want = cell([r["top1"] for r in tuned], pre + statistics.mean(r["cpu_seconds"] for r in tuned))
            else:
                frozen = [by_key[f"frozen:{method}:{task}:s{s}"] for s in seeds]
                want = cell([r["knn_top1" if how == "k-NN" else "linear_top1"] for r in frozen], pre)
            assert text == want, (line[0], col)
    assert {"500", "5000", "cifar10", "transfer"} <= set(seen), seen  # every label count, all labels, transfer
    docs = open(os.path.join(ROOT, "docs", "study.md")).read()
    assert "\n".join(lines[start:start + 2 + len(table)]) in docs  # docs/study.md shows the same table
    for r in rows:  # every run's row carries the command that reproduces it, with no path of the machine it ran on
        if r.get("stage") != "recipe":  # a recipe row records the search's choice, not a run
            words = shlex.split(r["command"])
            assert words[0] == "python" and not any(w.startswith("/") for w in words), r["key"]


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_seeds_draw_their_own_subsets_and_the_table_states_their_spread(tmp_path):
    """Catches seeds that share one subset draw or one initialization (the spread would hide the noise it is
    there to show), a mean ± std that is not over the seeds' own numbers, a headline.json (the seeds figure's
    data) that is not the table's, and a reading that claims a difference the seeds do not support."""
    transfer = small_folder(tmp_path / "transfer", train_per_class=20, test_per_class=10)
    out = str(tmp_path / "out")
    argv = [*with_flag(TINY, "--seeds", "2"), "--methods", "simclr", "--no-unseen", "--transfer-dir", transfer,
            "--out", out, "--no-figures"]
    table = study.main(argv)
    trees = [os.path.join(out, "data", name) for name in ("train_13pc", "train_13pc_s1")]
    draws = [study.class_files(t, "train") for t in trees]
    assert draws[0] != draws[1] and all({len(f) for f in d.values()} == {13} for d in draws)
    rows = read_jsonl(os.path.join(out, "results.jsonl"))
    ckpts = [torch.load(os.path.join(out, "runs", f"simclr_s{s}", "checkpoint.pt"), weights_only=True)
             for s in (0, 1)]
    assert [c["args"]["seed"] for c in ckpts] == [0, 1]
    assert [os.path.realpath(os.path.join(ROOT, c["args"]["data_dir"])) for c in ckpts] == [
        os.path.realpath(t) for t in trees]
    cells, headline = table_cells(table), json.load(open(os.path.join(out, "headline.json")))
    for model, label in (("simclr", "SimCLR"), ("random", "random init")):
        knn = [next(r["knn_top1"] for r in rows if r["run"] == f"{model}_s{s}" and r.get("eval") == "cifar10")
               for s in (0, 1)]
        m, sd = (knn[0] + knn[1]) / 2, abs(knn[0] - knn[1]) / 2 ** 0.5  # sample std of two values
        assert cells[label][0] == f"{m:.1f} ± {sd:.1f}", (label, cells[label][0], knn)
        assert headline["values"][model]["CIFAR-10 k-NN"] == {"0": knn[0], "1": knn[1]}
    tuned = [next(r["finetune_top1"] for r in rows if r["run"] == f"simclr_s{s}" and r.get("eval") == "finetune")
             for s in (0, 1)]
    assert headline["values"]["simclr"]["CIFAR-10 fine-tune"] == {"0": tuned[0], "1": tuned[1]}
    assert "Mean ± sample std over 2 seeds" in table and "What the 2 seeds support" in table
    # two seeds: a letter per network and column, and one line per headline column saying which pairs differ
    reading = [s for s in table.splitlines() if s.startswith("- CIFAR-10 k-NN (3 pairs): shown to differ: ")]
    assert len(reading) == 1 and "| SimCLR | " in table
    pairs = headline["pairs"]["CIFAR-10 k-NN"]  # every pair's test, for a reader who wants the t's and p's
    assert len(pairs) == 3
    for r in pairs:
        a, b = ({int(s): v for s, v in headline["values"][m]["CIFAR-10 k-NN"].items()} for m in (r["a"], r["b"]))
        assert r["t"] == pytest.approx(study.paired(a, b)[2]) and sum(a.values()) >= sum(b.values())


def test_archs_give_each_shape_a_study_of_its_own(tmp_path, capsys):
    """Catches --archs that runs one shape only, puts two shapes' runs in one folder (the second would resume the
    first's checkpoints), or accepts a shape that does not exist."""
    out = tmp_path / "two"
    study.main(["--protocol", "cpu", "--dataset", "folder", "--data-dir", SAMPLE, "--transfer-dir", SAMPLE,
                "--out", str(out), "--archs", "vit_mini/8,vit_tiny/4", "--dry-run"])
    printed = capsys.readouterr().out
    assert f"--arch vit_mini --patch-size 8 --img-size 32 " in printed
    assert f"--arch vit_tiny --patch-size 4 --img-size 32 " in printed
    for shape in ("vit_mini-8", "vit_tiny-4"):
        assert f"--out {study.shown(str(out / shape / 'runs' / 'simclr_s0'))}" in printed, shape
    assert printed.count(f"--data-dir {study.shown(str(out / 'data' / 'train_1000pc'))} ") >= 10  # shared subsets
    assert not out.exists()
    gpu = study.PROTOCOLS["gpu"]
    assert gpu["archs"] == ["vit_tiny/4", "vit_small/4"]
    for bad in ("vit_huge/4", "vit_tiny", "vit_tiny/four"):
        with pytest.raises(SystemExit, match="expected <arch>/<patch size>"):
            study.main(["--out", str(out), "--archs", bad, "--dry-run"])


def test_supervised_epochs_and_no_finetune(tmp_path, capsys):
    """Catches --supervised-epochs that does not reach the supervised baseline (or the CIFAR-10 fine-tuning, which
    has its budget), that changes the pretrainings' epochs, and --no-finetune that still fine-tunes. (The
    one-hour headline gives each side the same wall-clock this way: a supervised epoch costs less.)"""
    base = ["--protocol", "cpu", "--seeds", "1", "--methods", "simclr", "--dataset", "folder", "--data-dir", SAMPLE,
            "--transfer-dir", SAMPLE, "--out", str(tmp_path / "x"), "--epochs", "4", "--supervised-epochs", "9",
            "--dry-run"]
    study.main(base)
    printed = capsys.readouterr().out
    assert "--random-init --arch vit_mini --patch-size 8 --img-size 32 --dataset folder" in printed
    assert printed.count("--finetune-epochs 9 ") == 3  # supervised_s0, supervised5_s0, simclr_s0 on finetune
    assert "python simclr.py" in printed and "--epochs 4 " in printed and "--epochs 9" not in printed
    study.main([*base, "--no-finetune"])
    printed = capsys.readouterr().out
    assert printed.count(" --finetune ") == 2 and "on finetune" not in printed  # the supervised baselines' own


def test_cpu_seconds_counts_the_children_and_this_process():
    """Catches a CPU clock that misses a training script's process (the study runs it as a child: its CPU time
    would read 0) or this process's own (the supervised baseline trains in it): against the CPU time a child
    process and this one measure of themselves."""
    c0 = study.cpu_seconds(children=True)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert 0.5 <= study.cpu_seconds(children=True) - c0 < 3.0  # its burn, plus Python's start-up
    s0, p0 = study.cpu_seconds(), time.process_time()
    while time.process_time() - p0 < 0.3:
        pass
    assert study.cpu_seconds() - s0 >= 0.29  # (rusage and process_time tick at different grains)


def test_cost_columns_average_the_idle_runs_and_say_where_they_ran():
    """Catches cost cells that average contended and idle runs (issue 31: SimCLR 15.5 min on a shared seed 0
    against 3.1 on the idle seeds), a CPU time taken from a resumed run (its last part only), and a hardware line
    that names the machine re-tabulating the rows instead of the machines the rows were trained on."""
    def row(seed, seconds, load, **kw):
        return dict(kind="pretrain", run=f"simclr_s{seed}", model="simclr", seed=seed, part="main", seconds=seconds,
                    img_per_s=10000 / seconds, load_avg=load, hardware="Some CPU, 2 cores; torch x", **kw)
    latest = {("pretrain", f"simclr_s{s}", None): r for s, r in enumerate(
        [row(0, 930.0, 3.85), row(1, 200.0, 2.03), row(2, 160.0, 1.97, cpu_seconds=300.0),
         row(3, 100.0, 2.0, cpu_seconds=30.0, resumed=True)])}
    assert [study.idle(r) for r in latest.values()] == [False, True, True, True]
    assert study.cost_cell(latest, "simclr", "seconds") == "2.6 min"  # (200 + 160 + 100) / 3 = 153 s
    assert study.cost_cell(latest, "simclr", "img_per_s") == f"{(50 + 62.5 + 100) / 3:.0f}"
    assert study.cost_cell(latest, "simclr", "cpu_seconds") == "5.0 min"  # the resumed run's 30 s left out
    busy = {k: r for k, r in latest.items() if k[1] == "simclr_s0"}
    assert study.cost_cell(busy, "simclr", "seconds") == "15.5 min (busy)"
    assert study.cost_cell(busy, "simclr", "cpu_seconds") == "not recorded"
    assert study.idle({"load_avg": 3.9, "cores": 4}) and not study.idle({"load_avg": 2.2, "hardware": "X, 2 cores"})


def test_pretrain_row_records_each_networks_own_epochs(tmp_path, monkeypatch):
    """Catches a cost row that gives the supervised baseline the pretrainings' epoch count when --supervised-epochs
    differs (the one-hour headline's 44 supervised epochs were recorded as the 18 of SimCLR)."""
    cfg = {"epochs": 18, "supervised_epochs": 44, "batch_size": 256}
    monkeypatch.setattr(study, "train_command", lambda model, cfg: "python ...")
    monkeypatch.setattr(study, "log_cost", lambda run_dir: (10.0, 5.0))
    ckpt = str(tmp_path / "supervised" / "checkpoint.pt")
    study.save_baseline(ckpt, vit.vit_mini(img_size=16, patch_size=8), "supervised", 44, {}, seconds=3.0,
                        img_per_s=2.0)
    plan = {"cfg": cfg, "device": torch.device("cpu")}
    common = {"seed": 0, "part": "main", "data_dir": SAMPLE, "num_images": 130, "ckpt": ckpt}
    sup = study.pretrain_row(plan, {"name": "supervised_s0", "model": "supervised", **common})
    simclr = study.pretrain_row(plan, {"name": "simclr_s0", "model": "simclr", "run_dir": str(tmp_path), **common})
    assert (sup["epochs"], sup["seconds"], sup["img_per_s"]) == (44, 3.0, 2.0)
    assert (simclr["epochs"], simclr["seconds"], simclr["img_per_s"]) == (18, 10.0, 5.0)


def test_dry_run_with_the_defaults_needs_nothing_but_the_repository(tmp_path):
    """Catches a default that points outside the repository (a data folder only the developers' machines have):
    `python benchmarks/study.py --dry-run` in a copy of the repository with nothing beside it must print the
    whole plan, torchvision's CIFAR-10 and the transfer set's build included, and write nothing."""
    repo = tmp_path / "alone" / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, name), repo / name)
    for name in os.listdir(os.path.join(ROOT, "benchmarks")):
        if name.endswith((".py", ".txt")):
            shutil.copy(os.path.join(ROOT, "benchmarks", name), repo / "benchmarks" / name)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    run = subprocess.run([sys.executable, "benchmarks/study.py", "--dry-run"], cwd=repo, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[study] cifar10 from data as an ImageFolder tree of PNGs: runs/study/data/cifar10" in run.stdout
    assert "python benchmarks/tinyimagenet20.py --out data/tinyimagenet20 --archive-dir data" in run.stdout
    assert "python simclr.py --dataset folder --data-dir runs/study/data/train_1000pc" in run.stdout
    assert "shared" not in run.stdout + run.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "__pycache__" not in p.parts) == [
        p for p in before if "__pycache__" not in p.parts]


def test_a_torchvision_dataset_becomes_a_folder_tree_of_the_same_pixels(tmp_path, monkeypatch):
    """Catches the export of a torchvision dataset (the study's default, CIFAR-10) losing pixels (a lossy format),
    putting images under the wrong class, or leaving a half-written tree that a rerun would take as complete."""
    build = data.build_dataset

    def fake_build(name, root, split, transform=None, download=False):  # torchvision's CIFAR-10: PIL images
        assert (name, transform) == ("cifar10", None)
        return build("folder", SAMPLE, split, transform=None)
    monkeypatch.setattr(study.data, "build_dataset", fake_build)
    dst = str(tmp_path / "cifar10")
    assert study.export_folder("cifar10", "data", dst, download=True, dry_run=False) == dst
    assert not os.path.exists(dst + ".tmp")
    for split in ("train", "test"):
        src_set = build("folder", SAMPLE, split, transform=data.v2.PILToTensor())
        out_set = build("folder", dst, split, transform=data.v2.PILToTensor())
        assert out_set.classes == src_set.classes and len(out_set) == len(src_set)
        for i in (0, len(src_set) // 2, len(src_set) - 1):  # files are named by index: the same order
            assert out_set[i][1] == src_set[i][1] and torch.equal(out_set[i][0], src_set[i][0])

    def broken(name, root, split, transform=None, download=False):
        raise data.DataError("offline")
    monkeypatch.setattr(study.data, "build_dataset", broken)
    with pytest.raises(data.DataError):
        study.export_folder("cifar10", "data", str(tmp_path / "again"), download=True, dry_run=False)
    assert not os.path.exists(tmp_path / "again")


def _fake_tiny_imagenet(path, wrong_label=None):
    """A zip laid out as tiny-imagenet-200.zip, holding the manifest's files (small real JPEGs) and its label files."""
    rows = tinyimagenet20.manifest()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "JPEG")
    ann = []
    with zipfile.ZipFile(path, "w") as z:
        for i, (split, wnid, _, name) in enumerate(rows):
            # the archive's own layout, written out here rather than taken from the builder
            inside = f"train/{wnid}/images/{name}" if split == "train" else f"val/images/{name}"
            z.writestr(f"tiny-imagenet-200/{inside}", buf.getvalue() + str(i).encode())  # each file its own bytes
            if split == "test":
                ann.append(f"{name}\t{wrong_label if wrong_label and not ann else wnid}\t0\t0\t63\t63")
        z.writestr("tiny-imagenet-200/val/val_annotations.txt", "\n".join(ann) + "\n")
        z.writestr("tiny-imagenet-200/words.txt", "".join(f"{w}\tname of {w}\n" for w in {r[1] for r in rows}))
    return rows


def test_tinyimagenet20_is_built_from_the_archive_exactly_as_listed(tmp_path):
    """Catches a transfer set that is not the listed 3,000 files (a wrong path pattern, a val image under the
    wrong class, bytes changed on the way), a tree left half-built, and a run without the archive or the
    network that gives a traceback instead of one line."""
    archive = tmp_path / "tiny-imagenet-200.zip"
    rows = _fake_tiny_imagenet(archive)
    assert len(rows) == 3000 and {r[0] for r in rows} == {"train", "test"}
    out = tmp_path / "tinyimagenet20"
    tinyimagenet20.build(str(out), source=str(archive))
    with zipfile.ZipFile(archive) as z:
        for split, wnid, rel, name in rows:
            assert (out / split / wnid / name).read_bytes() == z.read(f"tiny-imagenet-200/{rel}"), rel
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.JPEG"))
    assert files == sorted(f"{s}/{w}/{n}" for s, w, _, n in rows)
    train = data.build_dataset("folder", str(out), "train")
    assert len(train.classes) == 20 and len(train) == 2000
    assert len(data.build_dataset("folder", str(out), "test")) == 1000
    assert (out / "classes.tsv").read_text().splitlines()[0] == f"{train.classes[0]}\tname of {train.classes[0]}"

    _fake_tiny_imagenet(tmp_path / "wrong.zip", wrong_label="n00000000")
    with pytest.raises(SystemExit, match="its label in val_annotations.txt is n00000000"):
        tinyimagenet20.build(str(tmp_path / "t2"), source=str(tmp_path / "wrong.zip"))
    assert not (tmp_path / "t2").exists()
    with pytest.raises(SystemExit, match="drop --no-download, or give --source") as e:
        tinyimagenet20.build(str(tmp_path / "t3"), download=False, archive_dir=str(tmp_path / "empty"))
    assert "\n" not in str(e.value)



# ---- the few-label protocol (benchmarks/few_label.py, `study.py --protocol few-label`) ----

import few_label  # noqa: E402  (benchmarks/, on the path above)

# One pretraining (SimCLR, 1 epoch of the sample at 16 px), 50 labels (5 a class), 2 seeds, the recipe search cut to
# one lr and one epoch count (its three augmentations for supervised), batch 16, no transfer row.
FEW = ["--protocol", "few-label", "--dataset", "folder", "--data-dir", SAMPLE, "--arch", "vit_mini", "--patch-size",
       "8", "--img-size", "16", "--epochs", "1", "--batch-size", "64", "--workers", "0", "--knn-every", "1",
       "--seeds", "2", "--methods", "simclr", "--labels", "50", "--search-epochs", "1", "--search-lrs", "1e-3",
       "--search-batch-size", "16", "--supervised-epochs", "1", "--monitor-val-fraction", "0.2", "--no-transfer",
       "--no-figures"]


def test_labelled_images_are_stratified_drawn_per_seed_and_apart_from_their_validation_split():
    """Catches a labelled draw that is not stratified, is the same for every seed (the seeds' spread would hide
    the draw's luck), is not the one `eval_linear.py --label-fraction F --label-seed s` draws (the rows' commands
    would not reproduce), or a validation split for the recipe search that overlaps the images it trains on or
    reaches outside the labelled images."""
    labels = data.labels(data.build_dataset("folder", SAMPLE, "train")).tolist()  # 100 of each of 10 classes
    draws = [few_label.label_draw(labels, 50, seed) for seed in (0, 1)]
    for d in draws:
        assert len(d) == 50 and torch.bincount(torch.tensor(labels)[d]).tolist() == [5] * 10
    assert set(draws[0].tolist()) != set(draws[1].tolist())
    assert torch.equal(draws[0], few_label.label_draw(labels, 50, 0))
    assert torch.equal(draws[1], eval_linear.stratified_split(labels, 0.05, 1)[1])  # --label-fraction 0.05 --label-seed 1
    train, val = few_label.search_split(labels, draws[0], 0.2, seed=0)
    assert set(train.tolist()).isdisjoint(val.tolist()) and set(train.tolist()) | set(val.tolist()) == set(
        draws[0].tolist())
    assert torch.bincount(torch.tensor(labels)[val]).tolist() == [1] * 10  # 20% of each class's 5


@pytest.mark.parametrize("peak, tried, chosen", [(40, [20, 10, 40, 80], 40), (160, [20, 10, 40, 80, 160], 160),
                                                 (10_000, [20, 10, 40, 80, 160], 160), (20, [20, 10, 40], 20)])
def test_few_label_search_doubles_the_epochs_while_the_longest_wins(peak, tried, chosen):
    """Catches a recipe search that stops at its grid's longest epoch count while that one still wins (the
    supervised baseline cut short: a strawman), one that doubles past max_epochs, or one that goes on doubling
    after a longer run lost: validation top-1 peaking at `peak` epochs, the epochs tried in order, the choice."""
    cfg = dict(lrs=[1e-3], augs=[few_label.AUGS_DEFAULT], search={"5000": dict(batch_size=8, epochs=[10, 20, 40],
                                                                                max_epochs=160)})
    runs = []

    def run(stage, trainer, task, seed, recipe, n=None, monitor=False):
        runs.append(recipe["epochs"])
        return {"top1": -abs(math.log2(recipe["epochs"] / peak))}  # validation top-1, highest at `peak` epochs
    recipe = few_label.Study.search(types.SimpleNamespace(cfg=cfg, run=run), "simclr", "5000", 5000)
    assert list(dict.fromkeys(runs)) == tried and recipe["epochs"] == chosen  # a point asked again: its row, reused


def test_few_label_search_never_doubles_past_the_pretrainings_images():
    """Catches a recipe search allowed more training than the hour's pretraining saw: the listed tasks' max_epochs
    against the image budget (500 labels, 5,000, tinyimagenet20's 2,000 train images), and a label count the table
    does not list (--labels) taking another count's cap (500's 1,600 epochs: 1.6 million images of 1,000) instead
    of the nearer grid capped by its own images."""
    cfg, budget = few_label.FEW_LABEL, few_label.FEW_LABEL["image_budget"]
    assert budget == cfg["hour_epochs"]["simclr"] * 50_000
    for task, n in (("500", 500), ("5000", 5000), ("transfer", 2000)):
        grid = cfg["search"][task]
        assert grid["max_epochs"] == few_label.epoch_cap(max(grid["epochs"]), n, budget)
        assert grid["max_epochs"] * n <= budget < 2 * grid["max_epochs"] * n
    for n, like, cap in ((1000, "500", 800), (50, "500", 12_800), (20_000, "5000", 40), (2000, "5000", 320)):
        args = study.get_args_parser().parse_args(["--protocol", "few-label", "--labels", f"500,{n}"])
        grid = few_label.resolve(args)["search"][str(n)]
        assert grid == {**cfg["search"][like], "max_epochs": cap}


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """One complete few-label study on the sample, with every network's training recorded: the backbone it started
    from and the train-split indices of the images (and labels) it trained on."""
    out = str(tmp_path_factory.mktemp("few") / "out")
    calls, real, monitors, real_loaders = [], study.train_eval, [], eval_linear.knn_monitor_loaders

    def recording(backbone, aug_set, *args, **kwargs):
        calls.append({"start": {k: v.clone() for k, v in backbone.state_dict().items()},
                      "images": {int(i) for i in data._base(aug_set)[1]}})
        return real(backbone, aug_set, *args, **kwargs)

    def recording_loaders(*args, **kwargs):  # the few-label k-NN monitor: the images it leaves out of its queries
        monitors.append({int(i) for i in kwargs.get("exclude", ())})
        return real_loaders(*args, **kwargs)
    mp = pytest.MonkeyPatch()
    mp.setattr(study, "train_eval", recording)
    mp.setattr(eval_linear, "knn_monitor_loaders", recording_loaders)
    try:
        table = study.main([*FEW, "--out", out])
    finally:
        mp.undo()
    rows = read_jsonl(os.path.join(out, "results.jsonl"))
    trained = [r for r in rows if r.get("stage") in ("search", "final")]  # written in the order they trained
    assert len(trained) == len(calls)
    return {"out": out, "table": table, "rows": rows, "runs": list(zip(trained, calls)), "monitors": monitors}


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_few_label_supervised_never_sees_an_unlabelled_images_label(few):
    """Catches a supervised-from-scratch run (the baseline the pretraining must beat) trained on images outside
    its seed's labelled draw, or a recipe search whose training images include its validation images: every
    supervised run's training images, against the draw and split recomputed here."""
    labels = data.labels(data.build_dataset("folder", SAMPLE, "train")).tolist()
    supervised = [(r, c) for r, c in few["runs"] if r["trainer"] == "supervised"]
    assert {(r["stage"], r["task"], r["seed"]) for r, _ in supervised} == {
        ("search", "50", 0), ("final", "50", 0), ("final", "50", 1), ("final", "cifar10", 0)}
    for r, c in supervised:
        if r["task"] == "cifar10":  # the all-label reference line
            assert c["images"] == set(range(len(labels)))
            continue
        drawn = set(few_label.label_draw(labels, 50, r["seed"]).tolist())
        if r["stage"] == "search":
            train, val = few_label.search_split(labels, sorted(drawn), 0.2, 0)
            assert c["images"] == set(train.tolist()) and c["images"].isdisjoint(val.tolist()), r["key"]
            assert r["num_eval"] == len(val) == 10
        else:
            assert c["images"] == drawn, r["key"]


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_few_label_monitor_never_scores_a_network_on_images_it_trained_on(few):
    """Catches the learning curve's supervised points scored by the k-NN monitor on queries that include the
    images the network was trained on with their labels: seed 0's label draw comes from the same per-class
    shuffle as the monitor's held-out queries, so all of it lies among them and the curve would flatter the
    supervised runs. What the monitor was told to leave out, against the run's own training images (that
    knn_monitor_loaders leaves them out: test_eval_linear's monitor test)."""
    labels = data.labels(data.build_dataset("folder", SAMPLE, "train")).tolist()
    held_out = set(eval_linear.stratified_split(labels, 0.2)[1].tolist())  # --monitor-val-fraction 0.2
    monitored = [(r, c) for r, c in few["runs"] if r.get("monitor_knn") is not None]
    assert monitored and len(monitored) == len(few["monitors"])
    for (r, c), excluded in zip(monitored, few["monitors"]):
        assert c["images"] & held_out, r["key"]  # the overlap this guards against is there to remove
        assert excluded == c["images"], r["key"]


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_few_label_dry_run_of_a_study_part_way_through_its_search(few, tmp_path, capsys):
    """Catches a --dry-run that crashes (a TypeError on a missing stage) on a study stopped after the lr stage of
    a recipe search, before its augmentation stage: the study's folder with those rows taken out."""
    out = tmp_path / "part"
    shutil.copytree(few["out"], out)
    rows = [r for r in few["rows"] if not (r.get("stage") == "search" and r["trainer"] == "supervised" and
                                           r["aug"] != few_label.AUGS_DEFAULT)]
    assert len(rows) < len(few["rows"])
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.main([*FEW, "--out", str(out), "--dry-run"]) is None
    printed = capsys.readouterr().out
    assert "search:supervised:50: its later stages wait on the rows above" in printed
    assert "search:supervised:50:s0:lr0.001:weak:ep1: python eval_linear.py" in printed  # what is left, listed


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_few_label_table_gives_a_resumed_pretraining_no_cost(few):
    """Catches a cost cell built on a pretraining that was resumed after an interruption: its row's CPU time
    covers the resumed part only, so the cell would understate it. The study's folder (its rows name it: a copy
    would be another study) with that row marked for the test's length."""
    path = os.path.join(few["out"], "results.jsonl")
    kept = open(path).read()
    rows = [{**r, "resumed": True} if r.get("key") == "pretrain:simclr" else r for r in few["rows"]]
    try:
        with open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        table = study.main([*FEW, "--out", few["out"]])
        assert len(read_jsonl(path)) == len(rows)  # nothing trained again
    finally:
        with open(path, "w") as f:
            f.write(kept)
    row50 = next([c.strip() for c in s.strip("|").split("|")] for s in table.splitlines() if s.startswith("| 50 "))
    assert row50[1].endswith(" h") and not any(c.endswith(" h") for c in row50[2:]), row50
    assert "SimCLR's pretraining was resumed after an interruption" in table


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_few_label_finetune_starts_from_the_pretrained_weights(few):
    """Catches a 'self-supervised + fine-tune' cell whose network starts from random init (or another network)
    instead of the pretraining's checkpoint, and a supervised run that starts from the pretrained weights."""
    ckpt = torch.load(os.path.join(few["out"], "runs", "simclr_hour", "checkpoint.pt"), weights_only=True)["backbone"]
    tuned = [(r, c) for r, c in few["runs"] if r["trainer"] == "simclr"]
    assert {(r["stage"], r["seed"]) for r, _ in tuned} == {("search", 0), ("final", 0), ("final", 1)}
    for r, c in tuned:
        assert c["start"].keys() == ckpt.keys() and all(torch.equal(c["start"][k], ckpt[k]) for k in ckpt), r["key"]
        assert r["ckpt"].endswith(os.path.join("simclr_hour", "checkpoint.pt"))
    for r, c in few["runs"]:
        if r["trainer"] == "supervised":
            assert not torch.equal(c["start"]["blocks.0.attn.qkv.weight"], ckpt["blocks.0.attn.qkv.weight"])


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_simclr_loss
@pytest.mark.needs_knn
def test_few_label_table_has_every_cell_and_a_rerun_trains_nothing(few, capsys):
    """Catches a few-label table with an empty cell, a cost that is not pretraining + fine-tune, a row without the
    command that reproduces it, or a second invocation that trains or evaluates again (the study resumes)."""
    lines = [s for s in few["table"].splitlines() if s.startswith("| ")]
    assert lines[0] == "| labels | supervised from scratch | SimCLR + k-NN | SimCLR + probe | SimCLR + fine-tune |"
    row50, full = ([c.strip() for c in s.strip("|").split("|")] for s in lines[1:3])
    assert row50[0] == "50 (5%)" and all(" ± " in c and c.endswith(" h") for c in row50[1:]), row50
    assert full[0] == "1,000 (all)" and full[-1] == "not run" and all(c.endswith(" h") for c in full[1:-1])
    rows = few["rows"]
    pre = next(r for r in rows if r["key"] == "pretrain:simclr")
    assert pre["cpu_seconds"] > 0.5 and pre["command"].startswith("python simclr.py ") and "--val-fraction 0.2" in \
        pre["command"]
    tuned = [r for r in rows if r.get("stage") == "final" and r["trainer"] == "simclr"]
    hours = (pre["cpu_seconds"] + sum(r["cpu_seconds"] for r in tuned) / len(tuned)) / 3600
    assert row50[-1].endswith(f" · {hours:.2f} h")
    for r in rows:
        if r.get("stage") in ("search", "final", "frozen"):
            assert r["command"].startswith("python eval_linear.py "), r
    assert "- **Recipes**" in few["table"] and "supervised on 50: lr 0.001 per 256" in few["table"]
    assert "Towards the all-label line: with 50 labels the best cell (SimCLR + " in few["table"]  # its name, not its key
    assert any(r.get("monitor_knn") is not None for r in rows if r.get("stage") == "search")  # the curve's points
    capsys.readouterr()
    calls = []
    mp = pytest.MonkeyPatch()
    mp.setattr(study, "train_eval", lambda *a, **k: calls.append(a))
    try:
        again = study.main([*FEW, "--out", few["out"]])
    finally:
        mp.undo()
    assert calls == [] and again == few["table"] and len(read_jsonl(os.path.join(few["out"], "results.jsonl"))) == len(rows)
    assert "simclr_hour: complete" in capsys.readouterr().out


def test_few_label_dry_run_lists_every_network_and_writes_nothing(tmp_path, capsys):
    """Catches a few-label dry run that leaves out a pretraining, the all-label line, a search's grid, a label
    count's seeds or the transfer row, or that writes anything."""
    transfer = small_folder(tmp_path / "transfer", train_per_class=20, test_per_class=10)
    out = tmp_path / "dry"
    study.main(["--protocol", "few-label", "--dataset", "folder", "--data-dir", SAMPLE, "--transfer-data-dir",
                transfer, "--out", str(out), "--labels", "100,500", "--dry-run"])  # (the sample has 1,000 labels)
    printed = capsys.readouterr().out
    assert not out.exists()
    cfg = few_label.FEW_LABEL
    for m in cfg["methods"]:
        assert f"[study] {m}_hour: python {m}.py --dataset folder" in printed
        assert f"--epochs {cfg['hour_epochs'][m]} " in printed and "--val-fraction 0.1 " in printed
    assert f"final:supervised:cifar10:s0:lr0.001:default:ep{cfg['full_label_epochs']}: python eval_linear.py " \
           "--random-init" in printed
    for n in (100, 500):
        grid = cfg["search"]["500"]  # a label count the protocol does not name takes the grid of its 500
        mid = grid["epochs"][len(grid["epochs"]) // 2]
        for trainer in ["supervised", *cfg["methods"]]:
            for lr in cfg["lrs"]:
                assert f"search:{trainer}:{n}:s0:lr{lr:g}:default:ep{mid}: python eval_linear.py " in printed
            for seed in range(cfg["seeds"]):
                assert f"final:{trainer}:{n}:s{seed}: the searched recipe" in printed
        for m in cfg["methods"]:
            for seed in range(cfg["seeds"]):
                assert f"frozen:{m}:{n}:s{seed}: python eval_linear.py --ckpt " in printed
    assert "--label-fraction 0.5 --label-seed 0 --val-fraction 0.2 " in printed  # 500 of the 1,000
    with pytest.raises(SystemExit, match="--finetune-lr: not a setting of --protocol few-label"):
        study.main(["--protocol", "few-label", "--finetune-lr", "1e-3", "--dry-run"])
    with pytest.raises(SystemExit, match="--labels 500,5000: each between 0 and the 1,000 train images"):
        study.main(["--protocol", "few-label", "--dataset", "folder", "--data-dir", SAMPLE, "--no-transfer",
                    "--out", str(out), "--dry-run"])
    assert "search:supervised:transfer:s0:lr0.001:default:ep30: python eval_linear.py --random-init" in printed
