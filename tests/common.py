"""Checks every method file's tests share: the same training script run in one process and in two gloo
processes on the same global batch, the sampler's order per epoch, small real-image folders, and the course's
checks of a momentum update.

Not a test module (pytest collects test_*.py only); the method test files import it."""
import copy
import importlib
import json
import os
import shutil
import socket

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "data_sample")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(out, epoch0=False):
    """The training epochs' lines of <out>/log.jsonl; epoch0=True: the untrained network's line first, too."""
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return lines if epoch0 else [line for line in lines if line["epoch"] > 0]


class FixedStatsBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d that normalizes with its (initial) running statistics in training too, so each sample's
    output is its own business. On CPU, gloo processes have no SyncBatchNorm: each would normalize its half of
    the batch, and two processes could never equal one. With this in every head, they must, exactly."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _main_in_process(rank, world, port, module, argv, result):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.nn.BatchNorm1d = FixedStatsBatchNorm1d  # before the script builds its heads
    model = importlib.import_module(module).main(argv)
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, result)


def run_in_processes(module, argv, world, out):
    """`module`.main(argv) in `world` processes as torchrun starts them (gloo on CPU; world 1: one plain
    process), heads with FixedStatsBatchNorm1d. Returns rank 0's (log lines, gradients of the last step)."""
    result = os.path.join(out, "grads.pt")
    argv = [*argv, "--out", out]
    if world == 1:
        _main_in_process(0, 1, 0, module, argv, result)
        torch.nn.BatchNorm1d = FixedStatsBatchNorm1d.__bases__[0]
    else:
        mp.spawn(_main_in_process, args=(world, free_port(), module, argv, result), nprocs=world, join=True)
    return read_log(out), torch.load(result)


def assert_same_first_step(module, argv, tmp_path):
    """One process against two on the same global batch (one step: --batch-size covers the data once, the
    learning rate of step 0 is 0): the logged loss and every parameter's gradient must agree."""
    (log1, grads1), (log2, grads2) = [run_in_processes(module, argv, world, str(tmp_path / f"world{world}"))
                                      for world in (1, 2)]
    assert len(log1) == len(log2) == 1
    assert abs(log1[0]["loss"] - log2[0]["loss"]) < 1e-5 * abs(log1[0]["loss"]), (log1, log2)
    assert grads1.keys() == grads2.keys() and len(grads1) > 0
    for name, g in grads1.items():
        torch.testing.assert_close(grads2[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item() + 1e-12,
                                   msg=lambda m: f"{name}: {m}")


class RecordingSampler(torch.utils.data.DistributedSampler):
    """A DistributedSampler that keeps every order it hands out (patched into data.py by the tests)."""
    orders = []

    def __iter__(self):
        order = list(super().__iter__())
        RecordingSampler.orders.append(order)
        return iter(order)


class FixedViews(torch.utils.data.Dataset):
    """The shipped sample's first images, each with two views drawn once: the same batch every epoch."""

    def __init__(self, n, transforms):
        torch.manual_seed(0)
        ds = data.build_dataset("folder", SAMPLE, "train", data.MultiView(transforms))
        self.items = [ds[i] for i in range(0, len(ds), len(ds) // n)][:n]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def small_folder(root, train_per_class, test_per_class):
    """A copy of the first images of each class of the shipped sample: a fixed small dataset."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in sorted(os.listdir(os.path.join(SAMPLE, split))):
            os.makedirs(os.path.join(root, split, c))
            for f in sorted(os.listdir(os.path.join(SAMPLE, split, c)))[:n]:
                shutil.copy(os.path.join(SAMPLE, split, c, f), os.path.join(root, split, c, f))
    return str(root)


def check_ema_endpoints(ema_update):
    """The course's checks of a momentum (target, teacher) update that give its rule no more away than its
    docstring: with m = 1 the target stays as it is, with m = 0 it becomes the online network's parameters; in
    both, in place, unrecorded by autograd, the target's buffers (BN statistics) and the online network untouched."""
    for m in (1.0, 0.0):
        torch.manual_seed(0)
        make = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))  # noqa: E731
        online, target = make(), make().requires_grad_(False)
        online(torch.randn(16, 5))  # online's BN statistics move, the target's stay
        online_before, target_before = copy.deepcopy(online.state_dict()), copy.deepcopy(target.state_dict())
        params = list(target.parameters())
        with torch.enable_grad():
            ema_update(target, online, m)
        want = target_before if m == 1.0 else {**target_before, **{n: p for n, p in online_before.items()
                                                                   if n in dict(target.named_parameters())}}
        for name, p in target.named_parameters():
            torch.testing.assert_close(p, want[name], msg=f"m = {m}: {name}")
            assert p.grad_fn is None and not p.requires_grad, f"m = {m}: {name} recorded by autograd"
        assert all(a is b for a, b in zip(target.parameters(), params)), "parameters replaced, not updated in place"
        for name, b in target.named_buffers():
            assert torch.equal(b, target_before[name]), f"m = {m}: the target's buffer {name} changed"
        for name, v in online.state_dict().items():
            assert torch.equal(v, online_before[name]), f"m = {m}: the online network's {name} changed"
