"""Bad input at the command line, generated from the parsers themselves: every option of every script (the five
method files, eval_linear.py, data.py's --show) is tried with the values that break things (0, -1, a huge number,
1e30, inf, nan, a word for a number). Each must be refused by argparse (exit 2, its last line naming the flag and
the value), end the run with one line (a SystemExit message: exit 1), or run; never a traceback. A flag added
tomorrow is tried the day it is added, and one without a checking type fails the census below. Also: the same
contract seen from a shell and under torchrun, and data whose labels make an accuracy meaningless (one class, a
test class the train split lacks)."""
import argparse
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import data
import eval_linear
import vit
from common import ROOT, SAMPLE

METHODS = [m for m in ("simclr", "moco", "byol", "swav", "dino") if os.path.exists(os.path.join(ROOT, f"{m}.py"))]
SCRIPTS = METHODS + ["eval_linear", "data"]
# The course's student copy stubs exercises these scripts reach (course/make_student_copy.py): a script's runs wait
# for its views (exercise 1), the k-NN monitor (4) and its own loss; the markers say so, so that the students'
# `pytest -m "not needs_<name>"` leaves them out until those exercises are written.
NEEDS = {"simclr": ["simclr_aug", "knn", "simclr_loss"], "moco": ["simclr_aug", "knn", "moco"],
         "byol": ["simclr_aug", "knn", "byol"], "swav": ["simclr_aug", "knn", "swav_sinkhorn", "swav_loss"],
         "dino": ["simclr_aug", "knn", "dino"], "eval_linear": ["simclr_aug", "knn"], "data": ["simclr_aug"]}


def needs(script):
    return [getattr(pytest.mark, f"needs_{name}") for name in NEEDS[script]]
BAD = ["0", "-1", "1000000000", "inf", "nan", "abc"]  # 1000000000: huge as an int and as a float
PATHS = {"data_dir", "out", "ckpt", "results"}  # names, not numbers: tried with "-1" only (argparse's quirk: a value
# that looks like a negative number), as a path that does not exist or a folder to write
TIME_CAP = 60.0  # seconds: a run that a value made endless is stopped here (none is: counts of epochs and
# iterations have an upper bound); what it printed until then must hold no traceback


def _folder(root, counts):
    """An ImageFolder tree of the shipped sample's first images: counts {class: (train images, test images)}."""
    for c, (n_train, n_test) in counts.items():
        for split, n in (("train", n_train), ("test", n_test)):
            os.makedirs(os.path.join(root, split, c))
            src = os.path.join(SAMPLE, split, c)
            for f in sorted(os.listdir(src))[:n]:
                shutil.copy(os.path.join(src, f), os.path.join(root, split, c, f))
    return str(root)


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    """Two classes of 8 train and 2 test images: the fastest run that has a k-NN and two batches of 8."""
    return _folder(tmp_path_factory.mktemp("micro"), {"cat": (8, 2), "dog": (8, 2)})


@pytest.fixture
def micro_vit(monkeypatch):
    """--arch vit_micro: one block of width 32, every script's own code at a small part of vit_mini's cost."""
    monkeypatch.setitem(vit.ARCHS, "vit_micro",
                        lambda **kw: vit.VisionTransformer(embed_dim=32, depth=1, num_heads=2, **kw))


def base_argv(script, data_dir, out):
    """A run of `script` that takes about a second on the CPU: 16 px images of 2x2 patches, small heads."""
    if script == "data":
        return ["--show", "simclr", "--data-dir", data_dir, "--img-size", "16", "--rows", "2", "--out",
                os.path.join(out, "views.png")]
    if script == "eval_linear":
        return ["--random-init", "--arch", "vit_micro", "--patch-size", "8", "--img-size", "16", "--dataset", "folder",
                "--data-dir", data_dir, "--batch-size", "8", "--workers", "0", "--device", "cpu", "--probe-epochs", "1",
                "--finetune", "--finetune-epochs", "1", "--results", os.path.join(out, "results.jsonl")]
    extra = {"swav": ["--num-prototypes", "16", "--small-crop-size", "8", "--num-small-crops", "1"],
             "dino": ["--bottleneck-dim", "16", "--small-crop-size", "8", "--num-small-crops", "1"]}.get(script, [])
    return ["--dataset", "folder", "--data-dir", data_dir, "--arch", "vit_micro", "--patch-size", "8", "--img-size",
            "16", "--batch-size", "8", "--warmup-epochs", "0", "--workers", "0", "--device", "cpu", "--epochs", "1",
            "--knn-every", "1", "--hidden-dim", "64", "--out-dim", "32", "--out", out, *extra]


def valued_options(parser):
    """Every option of `parser` that takes a value: (flag, argparse action)."""
    return [(a.option_strings[0], a) for a in parser._actions if a.option_strings and a.nargs != 0]


def is_checking(parse):
    """An argparse type made by data.py's factory (data._checked: positive_int, int_range(1, 1000), ...), or its
    device check."""
    return getattr(parse, "__qualname__", "") == "_checked.<locals>.parse" or parse is data.device_name


class TimeUp(BaseException):
    """Raised by the alarm in the run under test: a BaseException, so no `except Exception` in it can take it."""


def run_within(cap, fn, *args):
    """fn(*args), stopped with TimeUp after `cap` seconds."""
    def alarm(signum, frame):
        raise TimeUp()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, cap)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_every_option_that_takes_a_number_has_a_checking_type():
    """Catches a flag added with type=int or type=float (or no type for a number): argparse would take 0, -1 or nan
    for it and the run would meet the value later, in a traceback or a silent nonsense run. Every option that takes
    a value is a choice, a path (PATHS), or has one of data.py's checking types."""
    assert is_checking(data.positive_int) and is_checking(data.int_range(1, 2)) and not is_checking(int)
    unchecked = [f"{script}.py {flag} (type={getattr(a.type, '__name__', a.type)})"
                 for script in SCRIPTS for flag, a in valued_options(importlib.import_module(script).get_args_parser())
                 if a.choices is None and not is_checking(a.type) and not (a.dest in PATHS and a.type is None)]
    assert not unchecked, unchecked


@pytest.mark.parametrize("script", [pytest.param(script, marks=needs(script)) for script in SCRIPTS])
def test_every_option_with_every_breaking_value_ends_in_one_line_or_runs(script, micro_data, micro_vit, tmp_path,
                                                                          monkeypatch, capsys):
    """Catches a value that reaches the code unchecked and ends in a traceback (--batch-size 0: ZeroDivisionError,
    --lr -0.1: torch's error about the scaled value, --workers -1: DataLoader's ValueError, --rows 0), an error that
    prints more than one line, and an argparse error that does not name the flag and the value as typed. Values
    that argparse accepts run on tiny data, for at most TIME_CAP seconds each."""
    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)  # an --out 0 or --results -1 is written here, not into the repository
    tried, ran, failures = 0, 0, []
    for flag, action in valued_options(module.get_args_parser()):
        for value in (["-1"] if action.dest in PATHS else BAD):
            tried += 1
            out = str(tmp_path / f"case{tried}")
            argv = base_argv(script, micro_data, out) + [flag, value]
            capsys.readouterr()
            try:
                module.get_args_parser().parse_args(argv)
            except SystemExit as e:
                last = capsys.readouterr().err.strip().splitlines()[-1]
                if e.code != 2 or not last.startswith(f"{script}.py: error: argument {flag}") or value not in last:
                    failures.append(f"{flag} {value}: exit {e.code}, {last!r}")
                continue
            ran += 1
            try:
                run_within(TIME_CAP, module.main, argv)
            except TimeUp:
                pass
            except SystemExit as e:
                if not (isinstance(e.code, str) and e.code.strip() and "\n" not in e.code.strip()):
                    failures.append(f"{flag} {value}: SystemExit({e.code!r}) is not one line")
            except Exception as e:  # the traceback a user would have seen
                failures.append(f"{flag} {value}: {type(e).__name__}: {e}")
            finally:
                shutil.rmtree(out, ignore_errors=True)
            err = capsys.readouterr().err
            if "Traceback" in err:
                failures.append(f"{flag} {value}: a traceback on stderr: {err[-500:]}")
    assert tried > 20 and ran > 0, (tried, ran)  # the options were found, and some values went through to a run
    assert not failures, "\n".join(failures)


def test_a_type_names_the_flag_and_the_value_as_typed_and_refuses_nan():
    """Catches a check written as `value <= 0` (nan passes it: nan <= 0 is False), inf taken as a number, a bound off
    by one, and an error that shows a converted value (-0.1 as -0.0125 after the lr scaling) instead of the text."""
    assert data.positive_int("1") == 1 and data.nonneg_int("0") == 0 and data.seed_int(str(2 ** 32 - 1)) == 2 ** 32 - 1
    assert data.probability("0") == 0.0 and data.probability("1") == 1.0 and data.fraction("0.5") == 0.5
    assert data.positive_float("1e-8") == 1e-8 and data.nonneg_float("0") == 0.0
    for parse, text in [(data.positive_int, "0"), (data.nonneg_int, "-1"), (data.positive_float, "nan"),
                        (data.positive_float, "inf"), (data.positive_float, "0"), (data.nonneg_float, "nan"),
                        (data.nonneg_float, "-1e-9"), (data.probability, "nan"), (data.probability, "1.0001"),
                        (data.fraction, "1"), (data.fraction, "0"), (data.seed_int, str(2 ** 32)),
                        (data.positive_int, "1.5"), (data.pixel_side, "4097"), (data.width_int, "0")]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(text)} is not "):
            parse(text)
    with pytest.raises(SystemExit):
        data.script_parser("x", "simclr.py").parse_args(["--device", "nonsense"])
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="^cuda: this machine has no CUDA GPU"):
            data.device_name("cuda")


def _shell(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("args, status, last", [
    (["simclr.py", "--lr", "-0.1"], 2, "simclr.py: error: argument --lr: -0.1 is not a positive number"),
    (["eval_linear.py", "--batch-size", "0"], 2, "eval_linear.py: error: argument --batch-size: 0 is not a positive "
                                                 "integer"),
    (["byol.py", "--dataset", "folder", "--data-dir", "no_such_dir"], 1, None),
])
def test_from_a_shell_a_bad_value_is_one_line_on_stderr(args, status, last):
    """Catches what the in-process test cannot see: a traceback printed by Python at exit, a warning or a second
    line on stderr, the wrong exit status, and a usage line that names something other than the script."""
    run = _shell(args)
    err = run.stderr.strip().splitlines()
    assert run.returncode == status and "Traceback" not in run.stderr, run.stderr[-2000:]
    if status == 2:  # argparse: the usage, then the one line
        assert err[0].startswith(f"usage: {args[0]} ") and err[-1] == last, err
    else:
        assert len(err) == 1 and err[0].startswith("--data-dir no_such_dir does not exist"), err


@pytest.mark.parametrize("bad, said", [
    (["--batch-size", "0"], "simclr.py: error: argument --batch-size: 0 is not a positive integer"),
    pytest.param(["--data-dir", "no_such_dir"], "--data-dir no_such_dir does not exist", marks=needs("data")),
])
def test_under_torchrun_one_process_says_it_and_torchrun_reports_it(bad, said, tmp_path):
    """Catches every process printing the same error (once per GPU), and torchrun's failure report without the
    script's line as its root cause ("To enable traceback see ..." instead): for argparse's error and for one
    raised in main()."""
    argv = ["-m", "torch.distributed.run", "--nproc_per_node=2", "simclr.py", "--dataset", "folder", "--device", "cpu",
            "--data-dir", SAMPLE, "--out", str(tmp_path / "run"), *bad]
    run = _shell(argv, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    printed = [line for line in (run.stdout + run.stderr).splitlines() if said in line]
    # once from rank 0, once in the report's root cause ("traceback : <the line>"); not from rank 1
    assert len(printed) == 2 and printed[1].strip().startswith("traceback : "), run.stderr[-3000:]
    assert "To enable traceback" not in run.stderr.split("Root Cause")[-1], run.stderr[-3000:]


def test_labels_that_make_an_accuracy_meaningless_are_one_line():
    """Catches 100% reported for data with one class, a test class the train split lacks scored as a plain error
    rate, and an empty test set scored as 0% (the functions, with labels given directly)."""
    two, one = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 0])
    eval_linear.check_labels(two, torch.tensor([1, 0]), "x")  # fine: no exit
    for train, test, says in [(one, one, "has 1 class"), (two, torch.tensor([0, 2]), "label(s) [2]"),
                              (two, torch.tensor([], dtype=torch.long), "no test images")]:
        with pytest.raises(SystemExit, match=re.escape(says)) as e:
            eval_linear.check_labels(train, test, "x")
        assert "\n" not in str(e.value)


@pytest.mark.needs_simclr_aug
@pytest.mark.needs_knn
def test_one_class_and_a_class_only_in_the_test_split_stop_eval_and_training(micro_vit, tmp_path):
    """Catches k-NN 100.0 and linear 100.00 reported for a one-class folder, by eval_linear.py and by a training
    script's k-NN monitor, and a --val-fraction split that leaves a class in the validation part only (its images
    could never be right)."""
    one = _folder(tmp_path / "one", {"cat": (8, 3)})
    common = ["--random-init", "--arch", "vit_micro", "--patch-size", "8", "--img-size", "16", "--dataset", "folder",
              "--workers", "0", "--device", "cpu", "--probe-epochs", "1"]
    with pytest.raises(SystemExit, match="has 1 class"):
        eval_linear.main([*common, "--data-dir", one])
    method = importlib.import_module(METHODS[0])
    with pytest.raises(SystemExit, match=r"^the k-NN monitor \(--knn-every 0 turns it off\): the train split has 1 "):
        method.main(base_argv(METHODS[0], one, str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    # frog has one training image: a 0.9 validation fraction takes it (round(0.9) = 1) and leaves train none
    three = _folder(tmp_path / "three", {"cat": (8, 3), "dog": (8, 3), "frog": (1, 1)})
    with pytest.raises(SystemExit, match=r"the test split has label\(s\) \[2\] that the train split lacks"):
        eval_linear.main([*common, "--data-dir", three, "--val-fraction", "0.9"])
