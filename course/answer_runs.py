"""The training runs behind the course's numbers: each method's short run (course/README.md), the runs its
questions ask for and SimCLR's longer demo, with the commands, run one after the other, each with its CPU time.
Instructor-only (the student copy leaves it out): course/instructor_notes.md quotes its tables.

    python course/answer_runs.py OUT                      # every run not yet in OUT (hours on a 2-core CPU)
    python course/answer_runs.py OUT --only simclr_10     # some of them, by name
    python course/answer_runs.py OUT --table              # the table of what OUT holds, without running
    python course/answer_runs.py --list                   # the runs and their commands
    python course/answer_runs.py --measurements           # the numbers that need no training run (a minute)

Each run is `python <method>.py <flags> --out OUT/<name>` on the shipped sample (tests/data_sample), so its
log is OUT/<name>/log.jsonl. The table gives per run: the untrained network's k-NN (epoch 0), the first and
last epoch's loss and embed_std, the k-NN at every evaluated epoch, and the run's wall-clock and CPU time (user +
system of the run's process). To measure how much a run depends on the CPU's float summation order, run the
same names with another thread count into another OUT: `OMP_NUM_THREADS=1 python course/answer_runs.py OUT1`.

Question 6.1 needs BYOL without its stop-gradient, a change the sheet asks students to make in their copy: here
`python course/answer_runs.py --byol-without-stop-gradient <byol.py flags>` runs byol.py with z computed by the
online projector and backbone, with gradient (the predictor kept).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = ["--dataset", "folder", "--data-dir", "tests/data_sample", "--arch", "vit_mini", "--patch-size", "8",
          "--batch-size", "128", "--workers", "2", "--seed", "0"]
SHORT = SAMPLE + ["--epochs", "10", "--warmup-epochs", "1", "--knn-every", "5"]    # each method's short run
DEMO = SAMPLE + ["--epochs", "50", "--warmup-epochs", "5", "--knn-every", "10"]     # SimCLR's longer demo

# name: (what it answers, the script and its flags). The short runs are each method's expected numbers on the
# sheet and the baselines its questions compare with.
RUNS = {
    "simclr_10": ("SimCLR's short run; 1.2, 3.1, 3.2, 4.1, 4.2", ["simclr.py", *SHORT]),
    "moco_10": ("MoCo's short run; 5.2", ["moco.py", *SHORT]),
    "byol_10": ("BYOL's short run; 6.1, 6.2", ["byol.py", *SHORT]),
    "swav_10": ("SwAV's short run; 8.1", ["swav.py", *SHORT]),
    "dino_10": ("DINO's short run; 9.1", ["dino.py", *SHORT]),
    "simclr_10_no_colour": ("1.2", ["simclr.py", *SHORT, "--color-strength", "0"]),
    "simclr_10_t0.1": ("3.2", ["simclr.py", *SHORT, "--temperature", "0.1"]),
    "simclr_10_t1.0": ("3.2", ["simclr.py", *SHORT, "--temperature", "1.0"]),
    "moco_10_m0": ("5.2", ["moco.py", *SHORT, "--momentum", "0"]),
    "byol_10_no_stop_gradient": ("6.1", ["course/answer_runs.py", "--byol-without-stop-gradient", *SHORT]),
    "byol_10_m1": ("6.2", ["byol.py", *SHORT, "--momentum", "1.0"]),
    "swav_10_paper": ("8.2", ["swav.py", *SHORT, "--epsilon", "0.05", "--color-strength", "1.0"]),
    "dino_10_no_sharpening": ("9.1", ["dino.py", *SHORT, "--teacher-temp", "0.1", "--warmup-teacher-temp", "0.1"]),
    "simclr_50": ("SimCLR's longer demo (README)", ["simclr.py", *DEMO]),
}


def command(name, out):
    script, *flags = RUNS[name][1]
    return [sys.executable, script, *flags, "--out", os.path.join(out, name)]


def run(name, out):
    """Run `name` into out/name (cwd: the repository); returns (wall seconds, CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(os.path.join(out, f"{name}.txt"), "w") as log:
        subprocess.run(command(name, out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time() - t0, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def row(name, out):
    """One table row of out/name's log, or None if the run is not there."""
    path = os.path.join(out, name, "log.jsonl")
    if not os.path.exists(path):
        return None
    lines = [json.loads(line) for line in open(path)]
    first, last = lines[1], lines[-1]
    knn = ", ".join(f"{line['epoch']}: {line['knn_top1']:.1f}" for line in lines if line.get("knn_top1") is not None)
    times = json.load(open(os.path.join(out, "times.json"))).get(name, {}) if os.path.exists(
        os.path.join(out, "times.json")) else {}
    return (f"| {name} | {first['loss']:.3f} | {first['embed_std']:.4f} | {last['epoch']} | {last['loss']:.3f} | "
            f"{last['embed_std']:.4f} | {knn} | {times.get('wall', float('nan')) / 60:.1f} | "
            f"{times.get('cpu', float('nan')) / 60:.1f} |")


def table(out, names):
    print(f"runs in {out} (threads: {json.load(open(os.path.join(out, 'times.json'))).get('threads', '?')})"
          if os.path.exists(os.path.join(out, "times.json")) else f"runs in {out}")
    print("| run | loss ep 1 | embed_std ep 1 | last epoch | loss | embed_std | knn_top1 (epoch: %) | wall min | "
          "CPU min |\n|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = row(name, out)
        print(r if r else f"| {name} | not run |")


def byol_without_stop_gradient(argv):
    """byol.py with BYOL.forward's targets z from the online projector and backbone, with gradient (question 6.1)."""
    import torch
    sys.path.insert(0, ROOT)
    import byol

    def forward(self, x, num_views=2):
        h, p, _ = forward_with_stop_gradient(self, x, num_views)
        with torch.autocast(x.device.type, enabled=False):
            z = torch.cat([self.projector(part) for part in h.float().chunk(num_views)])
        return h, p, z

    forward_with_stop_gradient = byol.BYOL.forward
    byol.BYOL.forward = forward
    print("course/answer_runs.py: byol.py without the stop-gradient (z from the online network, with gradient)")
    byol.main(argv)


def measurements():
    """The answer key's numbers that need no training run (questions 1.1, 2.2, 5.1, 7.1, 7.2), printed; one thread,
    so timings do not depend on what else runs."""
    import math
    import time

    import torch
    sys.path[:0] = [ROOT] + [os.path.join(ROOT, *d) for d in (["tests"], ["course"], ["course", "grading"])]
    torch.set_num_threads(1)
    import moco
    import naive
    import simclr
    import swav
    import test_data
    import test_swav
    from test_ex07_swav_sinkhorn import sinkhorn_slow  # the paper's Algorithm 1 on Python floats (float64)

    areas = test_data.crop_measurements("simclr", "pil")[0]
    print(f"1.1  mean crop area of 1,000 PIL views of simclr_spec(32): {areas.mean():.3f} (uniform area: 0.540; the "
          f"Inception crop's simulation: {test_data.inception_crop_mean_area((0.08, 1.0)):.3f})")

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(256, 128, generator=g), torch.randn(256, 128, generator=g)
    t0 = time.perf_counter()
    slow = naive.nt_xent_loss_naive(z1, z2, 0.5)
    t_loop = time.perf_counter() - t0
    fast = simclr.nt_xent_loss(z1, z2, 0.5)  # (a first call warms up)
    t0 = time.perf_counter()
    for _ in range(20):
        simclr.nt_xent_loss(z1, z2, 0.5)
    t_fast = (time.perf_counter() - t0) / 20
    print(f"2.2  B = 256, D = 128, one thread: the loop {t_loop:.2f} s ({slow.item():.4f}), nt_xent_loss "
          f"{1e3 * t_fast:.2f} ms ({fast.item():.4f}): {t_loop / t_fast:,.0f} times faster")

    q = torch.nn.functional.normalize(torch.randn(8, 32, generator=g), dim=1)
    k = torch.nn.functional.normalize(q + 0.5 * torch.randn(8, 32, generator=g), dim=1)  # positives: the diagonal
    for tau in (0.2, 1.0):
        cos = (q @ k.T).requires_grad_()                               # (B, B) cosines
        ce = torch.nn.functional.cross_entropy(cos / tau, torch.arange(8))
        (grad_ce,) = torch.autograd.grad(ce, cos, retain_graph=True)
        (grad_moco,) = torch.autograd.grad(ce * 2 * tau, cos)
        print(f"5.1  tau = {tau}: d loss / d cos(q_0, k_0) = {grad_ce[0, 0]:.4f} without 2 tau, "
              f"{grad_moco[0, 0]:.4f} with it; largest |gradient| {grad_ce.abs().max():.4f} and "
              f"{grad_moco.abs().max():.4f}; moco.contrastive_loss {moco.contrastive_loss(q, k, tau):.4f}")

    scores = test_swav.random_scores(256, 100)
    for eps in (0.05, 0.02):
        dev = [((swav.sinkhorn(scores, eps, n).sum(0) - 2.56).abs().max() / 2.56).item() for n in (1, 3, 10)]
        print(f"7.1  epsilon {eps}: largest relative deviation of the column sums from B/K after 1, 3, 10 "
              f"iterations: {dev[0]:.3f}, {dev[1]:.3f}, {dev[2]:.4f}")

    def sinkhorn_without_max_subtraction(s, eps, iterations):  # swav.sinkhorn, one process, minus `- top`
        Q = torch.exp(s.float() / eps).T
        K, B = Q.shape
        Q /= Q.sum()
        for _ in range(iterations):
            Q /= Q.sum(dim=1, keepdim=True)
            Q /= K
            Q /= Q.sum(dim=0, keepdim=True)
            Q /= B
        return (Q * B).T

    clustered = test_swav.clustered_scores(24, 6, 0.05)
    for eps in (0.1, 0.05, 0.04, 0.03, 0.025, 0.02, 0.015, 0.01):
        want = sinkhorn_slow(clustered.double().tolist(), eps, 3)
        got = sinkhorn_without_max_subtraction(clustered, eps, 3)
        err = (got.double() - want).abs().max().item()
        print(f"7.2  epsilon {eps}: without the max-subtraction the codes are "
              f"{'NaN' if not torch.isfinite(got).all() else f'off by {err:.1e}'}; with it off by "
              f"{(swav.sinkhorn(clustered, eps, 3).double() - want).abs().max().item():.1e}")
    print(f"     (exp(1 / epsilon) overflows float32 from epsilon {1 / math.log(torch.finfo(torch.float32).max):.4f})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--byol-without-stop-gradient"]:
        return byol_without_stop_gradient(argv[1:])
    if argv[:1] == ["--measurements"]:
        return measurements()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="the folder of the runs (one subfolder per run)")
    p.add_argument("--only", nargs="+", choices=list(RUNS), metavar="NAME", help="these runs (default: all)")
    p.add_argument("--table", action="store_true", help="print the table of the runs in OUT, run nothing")
    p.add_argument("--list", action="store_true", help="print the runs and their commands, run nothing")
    args = p.parse_args(argv)
    names = args.only or list(RUNS)
    if args.list:
        for name in names:
            print(f"{name} ({RUNS[name][0]}):\n  python {' '.join(command(name, 'OUT')[1:])}")
        return 0
    if not args.out:
        p.error("OUT is required (or --list)")
    os.makedirs(args.out, exist_ok=True)
    times_path = os.path.join(args.out, "times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
    if not args.table:
        for name in names:
            if os.path.exists(os.path.join(args.out, name, "checkpoint.pt")):
                continue
            print(f"[{name}] python {' '.join(command(name, args.out)[1:])}", flush=True)
            wall, cpu = run(name, args.out)
            times[name] = {"wall": wall, "cpu": cpu}
            times["threads"] = threads
            json.dump(times, open(times_path, "w"), indent=1)
            print(f"[{name}] {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU", flush=True)
    table(args.out, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
