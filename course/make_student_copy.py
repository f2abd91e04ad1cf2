"""Make the student copy of the repository: the exercises' functions keep their signature and docstring (the
docstring is the specification), their bodies become `raise NotImplementedError("exercise N: ...")`.

The functions are found by name with `ast` (EXERCISES below), so the method files carry no exercise markers;
the instructor's repository keeps the reference. Which tests concern an exercise is said by pytest markers:
`ex_<name>` on its grading tests (course/grading/, instructor-only: against slow loops and formulas on seeded
random inputs; course/grade.py runs them) and on the students' own checks in tests/ (properties that give no
answer away), `needs_<name>` on the other tests that call it (the training scripts' runs). Both are registered in
pytest.ini. The copy leaves out the instructor's files (INSTRUCTOR_ONLY).

    python course/make_student_copy.py OUT                           # every exercise stubbed
    python course/make_student_copy.py OUT --exercises simclr_loss 4  # by name or number
    python course/make_student_copy.py OUT --check                   # and prove the kit works (minutes)
    python course/make_student_copy.py --list                        # the exercises
    python course/make_student_copy.py --trace                       # which tests call which exercise

--check makes the copy, then proves it holds no answer: none of the instructor's files (INSTRUCTOR_ONLY: the
answer key, course/grading/ with the grading tests and their slow references, the grader), and no run of WINDOW
tokens of a stubbed function's reference body anywhere (code, docstrings, comments, notebooks and text, whitespace
ignored). Then for each chosen exercise it runs `-m ex_<name>` twice: on an unstubbed copy (the students' checks in
tests/ and the grading tests in course/grading/: every one passes; the time it took is the sheet's) and on the
student copy (its checks, less those that also need another stubbed exercise: every one fails at that exercise's
NotImplementedError).
Then every test on the student copy that neither grades nor needs a stubbed exercise must pass: one that reaches
a stub depends on an exercise's function without saying so (mark it needs_<name>); one that fails without
reaching a stub is run on the unstubbed copy too, and if it fails there as well it is reported as a warning (the
repository's own failure, not the kit's). It prints what it ran, how long each run took, and what broke a rule.
--trace runs the whole suite once on a copy that records every call of an exercise's function, and prints which
tests call which exercises and which of them lack a marker: the way to keep the markers right as tests change.
"""
import argparse
import ast
import dataclasses
import io
import json
import keyword
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tokenize
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = ".student_copy"  # written into OUT: only a folder that holds it is ever replaced
# the answers, never in a student copy: the answer key, the grading tests with their slow references (and the
# grader that runs them), the runs behind the answer key, and the kit's own tests (they grade the kit with them)
INSTRUCTOR_ONLY = ("course/instructor_notes.md", "course/grade.py", "course/answer_runs.py", "course/grading/",
                   "tests/test_course.py")
# --check: this many consecutive tokens of an exercise's reference body found anywhere in the copy is a leak: 20 as
# written (about a line of code), or 28 with every name but attributes, keyword arguments and Python's keywords
# replaced by `_` (the body with its variables renamed). Shorter runs match the repository's idioms
# (`with torch.autocast(x.device.type, enabled=False)`, `.sum(dim=-1).mean(`).
WINDOW, RENAMED_WINDOW = 20, 28
GRADING = "course/grading"  # the grading tests (instructor-only)
ALLOWED_OVERLAPS = {  # (file, where, exercise function): why the copy may hold that run of its tokens
    ("data.py", "byol_specs", "data.simclr_spec"): "BYOL takes SimCLR's crop, flip and colour drop (BYOL §3.3, "
                                                   "Table 6); SimCLR's jitter strengths and blur are not in it",
}


def instructor_only(path):
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in INSTRUCTOR_ONLY)


@dataclasses.dataclass(frozen=True)
class Exercise:
    number: int
    name: str                 # the pytest markers ex_<name> (grading) and needs_<name> (other tests that call it)
    title: str
    functions: tuple          # (file, qualified name) of each function the student writes

    @property
    def marker(self):
        return f"ex_{self.name}"

    @property
    def needs_marker(self):
        return f"needs_{self.name}"

    def message(self, qualname, path):
        module = os.path.splitext(path)[0].replace("/", ".")
        return f"exercise {self.number}: write {module}.{qualname} (see course/README.md)"


# The course's exercises, in the order of the sheet (course/README.md). Exercise 10, the written one, has no code.
EXERCISES = (
    Exercise(1, "simclr_aug", "SimCLR's augmentation recipe", (("data.py", "simclr_spec"),)),
    Exercise(2, "simclr_loss_naive", "NT-Xent as a loop", (("course/naive.py", "nt_xent_loss_naive"),)),
    Exercise(3, "simclr_loss", "NT-Xent vectorized", (("simclr.py", "nt_xent_loss"),)),
    Exercise(4, "knn", "the weighted k-NN classifier", (("eval_linear.py", "knn_classify"),)),
    Exercise(5, "moco", "MoCo v3's contrastive loss, momentum encoder and forward",
             (("moco.py", "contrastive_loss"), ("moco.py", "ema_update"), ("moco.py", "MoCo.forward"))),
    Exercise(6, "byol", "BYOL's loss and target network", (("byol.py", "byol_loss"), ("byol.py", "ema_update"),
                                                           ("byol.py", "BYOL.forward"))),
    Exercise(7, "swav_sinkhorn", "SwAV's Sinkhorn-Knopp codes", (("swav.py", "sinkhorn"),)),
    Exercise(8, "swav_loss", "SwAV's swapped prediction", (("swav.py", "swav_loss"),)),
    Exercise(9, "dino", "DINO's loss, centre and teacher update",
             (("dino.py", "dino_loss"), ("dino.py", "update_center"), ("dino.py", "ema_update"))),
)


class KitError(SystemExit):
    """A one-line error of the kit (a function not found, a docstring missing, OUT not ours)."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def select(names):
    """The Exercise objects for names or numbers (None: all), in the sheet's order."""
    if not names:
        return list(EXERCISES)
    by_key = {**{e.name: e for e in EXERCISES}, **{str(e.number): e for e in EXERCISES}}
    unknown = [n for n in names if n not in by_key]
    if unknown:
        raise KitError(f"unknown exercise {', '.join(unknown)}; the exercises are "
                       f"{', '.join(f'{e.number} {e.name}' for e in EXERCISES)}")
    chosen = {by_key[n] for n in names}
    return [e for e in EXERCISES if e in chosen]


# ---- finding and stubbing functions with ast ----
def find_function(tree, qualname):
    """The FunctionDef of `qualname` ("f" at module level, "Class.f" a method) in a parsed module, or None."""
    scope, node = tree.body, None
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        scope = node.body
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _docstring_node(fn):
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def stub_source(source, stubs, path="<source>"):
    """`source` with the body of each function in `stubs` ({qualname: message}) replaced by
    `raise NotImplementedError(message)`: decorators, signature and docstring kept, every line after the docstring
    to the function's end dropped (comments inside the body too: they may give the answer away)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []
    for qualname, message in stubs.items():
        fn = find_function(tree, qualname)
        if fn is None:
            raise KitError(f"{path}: no function {qualname} (was it renamed? update EXERCISES in {__file__})")
        doc = _docstring_node(fn)
        if doc is None:
            raise KitError(f"{path}: {qualname} has no docstring, and a student given only its signature cannot "
                           f"write it (STYLE.md habit 12)")
        indent = doc.col_offset
        start, end = doc.end_lineno, fn.end_lineno     # lines[start:end]: the body after the docstring (0-based)
        # comment lines indented as the body after its last statement belong to it too
        while end < len(lines) and (not lines[end].strip() or (lines[end].lstrip().startswith("#") and
                                                              len(lines[end]) - len(lines[end].lstrip()) >= indent)):
            end += 1
        while end > fn.end_lineno and not lines[end - 1].strip():  # ... but not the blank lines after it
            end -= 1
        assert '"' not in message and "\\" not in message, message
        edits.append((start, end, " " * indent + f'raise NotImplementedError("{message}")\n'))
    for start, end, replacement in sorted(edits, reverse=True):
        lines[start:end] = [replacement]
    stubbed = "".join(lines)
    check_stub(source, stubbed, stubs, path)
    return stubbed


def check_stub(original, stubbed, stubs, path="<source>"):
    """Raise KitError unless every function of `stubs` in `stubbed` has the original's decorators, signature and
    docstring and a body that is exactly the docstring and the raise, and nothing else in the module changed."""
    old_tree, new_tree = ast.parse(original), ast.parse(stubbed)
    for qualname, message in stubs.items():
        old, new = find_function(old_tree, qualname), find_function(new_tree, qualname)
        same = lambda attr: ast.dump(getattr(old, attr)) == ast.dump(getattr(new, attr))  # noqa: E731
        if not (new and same("args") and all(map(ast.dump, old.decorator_list)) and
                [ast.dump(d) for d in old.decorator_list] == [ast.dump(d) for d in new.decorator_list] and
                ast.get_docstring(old, clean=False) == ast.get_docstring(new, clean=False) and
                (old.returns is None) == (new.returns is None)):
            raise KitError(f"{path}: stubbing {qualname} changed its decorators, signature or docstring")
        body = new.body[1:]
        if not (len(body) == 1 and isinstance(body[0], ast.Raise) and isinstance(body[0].exc, ast.Call) and
                getattr(body[0].exc.func, "id", None) == "NotImplementedError" and
                ast.literal_eval(body[0].exc.args[0]) == message):
            raise KitError(f"{path}: the stub of {qualname} is not `raise NotImplementedError(...)`")
        old.body, new.body = old.body[:1], new.body[:1]  # the rest of the module must be the same
    if ast.dump(old_tree) != ast.dump(new_tree):
        raise KitError(f"{path}: stubbing changed more than the functions' bodies")


# ---- the copy ----
def repo_files(root):
    """The repository's files (tracked, and untracked ones git does not ignore) that exist, relative to root; no
    .git (its history holds the reference), no caches, no runs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an archive): walk it
        skip = {".git", "__pycache__", ".pytest_cache", "runs", "data", ".venv", ".ci-venv"}
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in skip]
            files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if not f.endswith(".pyc")]
    return sorted(f for f in set(files) if os.path.isfile(os.path.join(root, f)) and f != STAMP)


def prepare_out(out):
    if os.path.exists(out):
        if not os.path.isdir(out) or (os.listdir(out) and not os.path.exists(os.path.join(out, STAMP))):
            raise KitError(f"{out} exists and is not a student copy made by this script: choose another OUT")
        shutil.rmtree(out)
    os.makedirs(out)


def copy_repo(root, out, exercises, instructor=None):
    """Copy the repository at `root` to `out` with the bodies of `exercises`' functions stubbed. The instructor's
    files (INSTRUCTOR_ONLY) come along only when `instructor` (default: when nothing is stubbed, the reference
    copy). Returns the number of files copied."""
    if os.path.realpath(out) == os.path.realpath(root) or os.path.realpath(out).startswith(
            os.path.realpath(root) + os.sep):
        raise KitError(f"{out} is inside the repository: choose a folder outside it")
    prepare_out(out)
    stubs = {}
    for e in exercises:
        for path, qualname in e.functions:
            stubs.setdefault(path, {})[qualname] = e.message(qualname, path)
    instructor = not exercises if instructor is None else instructor
    files = [f for f in repo_files(root) if instructor or not instructor_only(f)]
    missing = sorted(set(stubs) - set(files))
    if missing:
        raise KitError(f"{', '.join(missing)} not in the repository (an exercise's file)")
    for f in files:
        dst = os.path.join(out, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if f in stubs:
            with open(os.path.join(root, f), encoding="utf-8") as src:
                text = stub_source(src.read(), stubs[f], f)
            with open(dst, "w", encoding="utf-8") as dst_file:
                dst_file.write(text)
            shutil.copymode(os.path.join(root, f), dst)
        else:
            shutil.copy2(os.path.join(root, f), dst)
    if exercises:
        add_banner(out, exercises)
    with open(os.path.join(out, STAMP), "w") as f:
        f.write(" ".join(e.name for e in exercises) + "\n")
    return len(files)


def add_banner(out, exercises):
    """A section on top of the copy's README.md: what is stubbed and how to grade it."""
    readme = os.path.join(out, "README.md")
    rest = open(readme, encoding="utf-8").read() if os.path.exists(readme) else ""
    rows = "\n".join(f"| {e.number} | {e.title} | {', '.join(f'`{p}`: `{q}`' for p, q in e.functions)} | "
                     f"`python -m pytest -m {e.marker}` |" for e in exercises)
    banner = (
        "# Student copy\n\n"
        "In this copy the functions below raise `NotImplementedError`: writing them is the assignment. Their "
        "docstrings are the specification. The assignment sheet, with the paper sections to read, the questions, the "
        "points and what a correct implementation prints in the short runs, is [course/README.md](course/README.md); "
        "[course/assignment.ipynb](course/assignment.ipynb) walks through it (locally or on Colab).\n\n"
        "| exercise | concept | write | check with |\n|---|---|---|---|\n" + rows + "\n\n"
        "The checks are properties any correct solution has (shapes, gradients, invariants): they help, they do not "
        "grade. Your instructor grades your exercise files with tests of their own (course/README.md, \"How you are "
        "graded\"). The other tests that call an exercise's function carry `needs_<name>`: "
        "`python -m pytest -m \"not needs_dino\"` runs everything that does not wait for exercise 9. When every "
        "exercise passes, the whole suite (`python -m pytest`) passes.\n\n---\n\n")
    with open(readme, "w", encoding="utf-8") as f:
        f.write(banner + rest)


# ---- --check: no answer anywhere in the copy ----
TOKEN = re.compile(r"\d+\.\d*(?:e[-+]?\d+)?|\.\d+|\d+|\w+|\*\*|//|->|[-+*/%&|^@<>=!]=|\S")


def tokens(text):
    """Text as a token sequence, whitespace and line breaks ignored: `F.normalize(q, dim=1)` in code, in a
    docstring, a comment or markdown gives the same tokens."""
    return TOKEN.findall(text)


def split_comments(source):
    """(Python source with its comments blanked, its comments joined), or (source, "") if it does not tokenize."""
    try:
        found = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    except (tokenize.TokenError, SyntaxError):
        return source, ""
    lines = source.splitlines(keepends=True)
    for t in found:  # one comment per line at most
        row, col = t.start
        lines[row - 1] = lines[row - 1][:col] + lines[row - 1][col + len(t.string):]
    return "".join(lines), "\n".join(t.string.lstrip("#") for t in found)


def reference_body(source, qualname):
    """The tokens of `qualname`'s body after its docstring in `source`, its comments dropped: what a stub removes."""
    fn = find_function(ast.parse(source), qualname)
    body = "".join(source.splitlines(keepends=True)[_docstring_node(fn).end_lineno:fn.end_lineno])
    return tokens(split_comments(textwrap.dedent(body))[0])


def text_streams(path):
    """[(where, tokens)]: the token sequences a file holds, each with where it is. A Python file's top-level
    functions and classes one by one (code and docstrings, then comments), and the rest of the module; a
    notebook's cells; any other text file's text. Binary files hold none."""
    try:
        text = open(path, encoding="utf-8").read()
    except (UnicodeDecodeError, OSError):
        return []
    if path.endswith(".py"):
        try:
            nodes = [n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        except SyntaxError:
            nodes = []
        lines, streams, rest = text.splitlines(keepends=True), [], text.splitlines(keepends=True)
        for n in nodes:
            first = min([n.lineno] + [d.lineno for d in n.decorator_list])
            part = "".join(lines[first - 1:n.end_lineno])
            rest[first - 1:n.end_lineno] = [""] * (n.end_lineno - first + 1)
            streams += [(n.name, tokens(t)) for t in split_comments(textwrap.dedent(part))]
        return streams + [("module", tokens(t)) for t in split_comments("".join(rest))]
    if path.endswith(".ipynb"):
        try:
            text = "\n".join("".join(cell.get("source", "")) for cell in json.loads(text).get("cells", []))
        except (ValueError, AttributeError):
            pass
    return [("text", tokens(text))]


def renamed(toks):
    """Tokens with every name replaced by `_` except attributes (`.cat`), keyword arguments (`dim=`) and Python's
    keywords: a body whose variables were renamed gives the same sequence."""
    return ["_" if (t[0].isalpha() or t[0] == "_") and t not in keyword.kwlist and not (i and toks[i - 1] == ".")
            and not (i + 1 < len(toks) and toks[i + 1] == "=" and i and toks[i - 1] in "(,") else t
            for i, t in enumerate(toks)]


def find_answers(root, out, exercises, window=WINDOW, renamed_window=RENAMED_WINDOW):
    """Every place in `out` that holds `window` consecutive tokens of a stubbed function's reference body in `root`
    (the whole body, if shorter), or `renamed_window` of them with the variables renamed: code, docstrings,
    comments, notebooks and text files alike, less the overlaps ALLOWED_OVERLAPS explains. Returns (leaks,
    allowed), lists of "file (where): n tokens of module.function's reference body (exercise N): '...'"."""
    grams = {}  # (renamed?, n, tuple of n tokens) -> (exercise, "module.function")
    for e in exercises:
        for path, qualname in e.functions:
            body = reference_body(open(os.path.join(root, path), encoding="utf-8").read(), qualname)
            for rename, w in ((False, window), (True, renamed_window)):
                toks, n = renamed(body) if rename else body, min(w, len(body))
                for i in range(len(toks) - n + 1):
                    grams.setdefault((rename, n, tuple(toks[i:i + n])), (e, f"{os.path.splitext(path)[0]}.{qualname}"))
    sizes = sorted({(rename, n) for rename, n, _ in grams})
    leaks, allowed = [], []
    for f in repo_files(out):
        for where, stream in text_streams(os.path.join(out, f)):
            windows = {}  # (exercise, name) -> [(start, end)] of the matching windows in the stream
            forms = {False: stream, True: renamed(stream)}
            for rename, n in sizes:
                for i in range(len(stream) - n + 1):
                    hit = grams.get((rename, n, tuple(forms[rename][i:i + n])))
                    if hit:
                        windows.setdefault(hit, []).append((i, i + n))
            for (e, name), found in windows.items():
                runs = []  # overlapping windows merged into runs
                for start, end in sorted(found):
                    if runs and start <= runs[-1][1]:
                        runs[-1][1] = max(runs[-1][1], end)
                    else:
                        runs.append([start, end])
                for start, end in runs:
                    text = " ".join(stream[start:end])
                    line = (f"{f} ({where}): {end - start} tokens of {name}'s reference body (exercise {e.number}): "
                            f"'{text if len(text) < 160 else text[:157] + '...'}'")
                    (allowed if (f, where, name) in ALLOWED_OVERLAPS else leaks).append(line)
    return sorted(leaks), sorted(allowed)


# ---- --check ----
def run_pytest(cwd, marker_expr, label):
    """pytest -m marker_expr in cwd. Returns ({test id: (outcome, message)}, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "results.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               "-m", marker_expr, f"--junitxml={xml}", "-o", "junit_family=xunit1"]
        print(f"[{label}] (cd {cwd} && python -m pytest -m '{marker_expr}')", flush=True)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        seconds = time.time() - t0
        summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        print(f"[{label}] {summary} ({seconds:.0f} s)", flush=True)
        if r.returncode not in (0, 1, 5) or not os.path.exists(xml):  # 5: no test selected
            raise KitError(f"pytest did not run in {cwd} (exit {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        results = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            # (a test file that cannot even be imported comes as a case without classname, named after the file)
            test_id = f"{case.get('classname')}::{case.get('name')}" if case.get("classname") else case.get("name")
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome, message = child.tag, (child.get("message") or "") + "\n" + (child.text or "")
            results[test_id] = (outcome, message)
    return results, seconds


def _node_id(test_id):
    """junit's "tests.test_x::name[params]" as pytest's node id "tests/test_x.py::name[params]"."""
    module, _, name = test_id.partition("::")
    return f"{module.replace('.', '/')}.py::{name}"


def run_pytest_ids(cwd, node_ids, label):
    """pytest on the given node ids in cwd. Returns {node id: outcome}."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "results.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               "-o", "junit_family=xunit1", *node_ids]
        print(f"[{label}] (cd {cwd} && python -m pytest {' '.join(node_ids)})", flush=True)
        subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        outcomes = {}
        for case in ET.parse(xml).getroot().iter("testcase") if os.path.exists(xml) else []:
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            outcomes[_node_id(f"{case.get('classname')}::{case.get('name')}")] = outcome
    return outcomes


def check(root, out, exercises):
    """The kit's proof (see the module docstring). Returns (problems, timings): problems empty when the kit works,
    timings {exercise number: seconds of its grading command on the reference}."""
    problems, warnings, timings = [], [], {}
    ini = open(os.path.join(root, "pytest.ini"), encoding="utf-8").read()
    sheet = open(os.path.join(root, "course", "README.md"), encoding="utf-8").read()
    for e in exercises:
        for marker in (e.marker, e.needs_marker):
            if not re.search(rf"^\s+{marker}:", ini, re.M):
                problems.append(f"pytest.ini does not register the marker {marker}")
        if f"-m {e.marker}" not in sheet:
            problems.append(f"course/README.md has no grading command `python -m pytest -m {e.marker}`")
    # 0. the copy holds no answer: no instructor's file, and no run of an exercise's reference body anywhere
    problems += [f"{f} is in the student copy: it is the instructor's" for f in repo_files(out) if instructor_only(f)]
    leaks, allowed = find_answers(root, out, exercises)
    problems += [f"answer in the student copy: {leak}" for leak in leaks]
    for line in allowed:
        f, where = line.split(" ", 1)[0], line.split("(", 1)[1].split(")", 1)[0]
        why = next(v for (af, aw, _), v in ALLOWED_OVERLAPS.items() if (af, aw) == (f, where))
        print(f"allowed overlap: {line}\n  ({why})")
    print(f"searched the copy for runs of {WINDOW} tokens of {sum(len(e.functions) for e in exercises)} reference "
          f"bodies: {len(leaks)} found", flush=True)
    needs = " or ".join(e.needs_marker for e in exercises)
    first_line = lambda outcome, m: m.strip().splitlines()[0] if m.strip() else outcome  # noqa: E731

    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        reference = os.path.join(tmp, "repo")
        copy_repo(root, reference, [])
        for e in exercises:
            # 1. on the reference the exercise's grading tests pass: `python -m pytest -m ex_<name>`, timed
            ref, timings[e.number] = run_pytest(reference, e.marker, f"{e.number} reference")
            if not ref:
                problems.append(f"exercise {e.number}: no test carries {e.marker}")
            problems += [f"{t} fails on the reference: {first_line(o, m)}" for t, (o, m) in ref.items()
                         if o in ("failure", "error")]
            # 2. on the student copy they fail at this exercise's stub (less those that need another stubbed one)
            stub, _ = run_pytest(out, f"{e.marker} and not ({needs})", f"{e.number} student copy")
            if ref and not stub:
                problems.append(f"exercise {e.number}: every {e.marker} test also needs a stubbed exercise")
            for test_id, (outcome, message) in stub.items():
                if "::" not in test_id:  # a file that cannot be imported: reported once, by step 3
                    continue
                hit = re.search(r"NotImplementedError.*exercise (\d+): write", message)
                if outcome not in ("failure", "error"):
                    problems.append(f"{test_id} {outcome} on the student copy: it does not grade exercise {e.number}")
                elif not hit:
                    problems.append(f"{test_id} fails on the student copy, but not at a stub: "
                                    f"{first_line(outcome, message)}")
                elif hit.group(1) != str(e.number):
                    problems.append(f"{test_id} fails at exercise {hit.group(1)}'s stub: mark it "
                                    f"needs_{select([hit.group(1)])[0].name}")

        # 3. on the student copy every test that neither grades nor needs a stubbed exercise passes; one that
        # fails there without reaching a stub is run on the reference too: failing there as well, it is broken in
        # the repository (a warning: not the kit's doing), else the stubs broke it
        grading = " or ".join(e.marker for e in exercises)
        rest, rest_s = run_pytest(out, f"not ({grading} or {needs})", "all other tests, student copy")
        unexplained = []
        for test_id, (outcome, message) in rest.items():
            if outcome not in ("failure", "error"):
                continue
            hit = re.search(r"exercise (\d+): write ([\w.]+)", message)
            if hit and "::" not in test_id:  # the file cannot be imported: markers cannot help
                problems.append(f"{test_id} cannot be imported on the student copy: it calls {hit.group(2)} at import "
                                f"(in a parametrize list or at module level); build that inside the tests, then "
                                f"mark them needs_{select([hit.group(1)])[0].name}")
            elif hit:
                problems.append(f"{test_id} breaks on the student copy: it calls {hit.group(2)}; mark it "
                                f"needs_{select([hit.group(1)])[0].name}")
            else:
                unexplained.append((test_id, first_line(outcome, message)))
        if unexplained:
            ids = [_node_id(t) for t, _ in unexplained]
            again = run_pytest_ids(reference, ids, "the same failures, reference")
            for (test_id, why), node in zip(unexplained, ids):
                if again.get(node, "passed") in ("failure", "error"):
                    warnings.append(f"{test_id} fails on the reference too (not the kit's doing): {why}")
                else:
                    problems.append(f"{test_id} breaks on the student copy only: {why}")
    print(f"{len(rest)} other tests on the student copy in {rest_s:.0f} s")
    for w in warnings:
        print(f"warning: {w}")
    return problems, timings


# ---- --trace: which tests call which exercise (to keep the markers right as the tests change) ----
def trace_source(source, qualnames, number, path="<source>"):
    """`source` with a first statement added to each function of `qualnames` (after its docstring) that appends
    "<the running test>\t<number>" to the file $COURSE_TRACE: pytest names the running test in
    $PYTEST_CURRENT_TEST, which subprocesses (torchrun, the study's runs) inherit."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for qualname in sorted(qualnames, key=lambda q: -find_function(tree, q).lineno):
        fn = find_function(tree, qualname)
        doc = _docstring_node(fn)
        line = (" " * doc.col_offset + "__import__('course_trace_hook').hit(" + str(number) + ")\n")
        lines[doc.end_lineno:doc.end_lineno] = [line]
    return "".join(lines)


TRACE_HOOK = """import os


def hit(number):
    path = os.environ.get("COURSE_TRACE")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\\t{number}\\n")
"""


def declared_markers(root):
    """{(test file, test function): set of marker names} from the decorators, pytest.param marks and module-level
    pytestmark of tests/ and the grading tests, read with ast (what a reader sees)."""
    marks = lambda node: {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and  # noqa: E731
                          isinstance(n.value, ast.Attribute) and n.value.attr == "mark"}
    out = {}
    for folder in ("tests", GRADING):
        names = sorted(os.listdir(os.path.join(root, folder))) if os.path.isdir(os.path.join(root, folder)) else []
        for name in (n for n in names if n.startswith("test_") and n.endswith(".py")):
            tree = ast.parse(open(os.path.join(root, folder, name), encoding="utf-8").read())
            module = set().union(*[marks(n) for n in tree.body if isinstance(n, ast.Assign) and
                                   any(getattr(t, "id", None) == "pytestmark" for t in n.targets)])
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                    out[(f"{folder}/{name}", node.name)] = module | set().union(*map(marks, node.decorator_list))
    return out


def trace(root, exercises):
    """Run the whole suite on a copy whose exercise functions record each call, and print, per test function, the
    exercises it calls and any marker it lacks (ex_<name> or needs_<name>). Returns the missing markers."""
    with tempfile.TemporaryDirectory(prefix="trace-") as tmp:
        copy = os.path.join(tmp, "repo")
        copy_repo(root, copy, [])
        for e in exercises:
            for path, qualname in e.functions:
                file = os.path.join(copy, path)
                source = open(file, encoding="utf-8").read()
                open(file, "w", encoding="utf-8").write(trace_source(source, [qualname], e.number, path))
        open(os.path.join(copy, "course_trace_hook.py"), "w").write(TRACE_HOOK)
        log = os.path.join(tmp, "trace.tsv")
        env = {**os.environ, "COURSE_TRACE": log, "PYTHONPATH": copy + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        print(f"[trace] (cd {copy} && {' '.join(cmd[1:])})", flush=True)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
        lines = r.stdout.strip().splitlines()
        print(f"[trace] {lines[-1] if lines else ''} ({time.time() - t0:.0f} s)")
        calls = {}
        for line in open(log) if os.path.exists(log) else []:
            test, _, number = line.rstrip("\n").rpartition("\t")
            node = re.sub(r" \((setup|call|teardown)\)$", "", test)
            file, _, name = node.partition("::")
            calls.setdefault((file, re.sub(r"\[.*$", "", name)), set()).add(int(number))
    by_number = {e.number: e for e in exercises}
    declared = declared_markers(root)
    missing = []
    for key in sorted(calls):
        names = [by_number[n].name for n in sorted(calls[key])]
        have = declared.get(key, set())
        lack = [n for n in names if f"ex_{n}" not in have and f"needs_{n}" not in have]
        where = (f"{key[0]}::{key[1]}" if key[0] != "?" else
                 "while collecting (a test file calls it at import: markers cannot help, move the call into the test)")
        print(f"{where}: calls {', '.join(names)}" + (f"; missing: {', '.join(f'needs_{n}' for n in lack)}"
                                                      if lack else ""))
        missing += [(key, n) for n in lack]
    print("(a module-scoped fixture's calls count for the first test that uses it only)")
    return missing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="the folder to write the student copy to (outside the repository)")
    p.add_argument("--exercises", nargs="+", metavar="NAME",
                   help="exercise names or numbers to stub (default: all; --list shows them)")
    p.add_argument("--check", action="store_true",
                   help="then prove the kit: grading tests pass on the reference, fail on the copy, and no other "
                        "test breaks on the copy (runs most of the test suite: minutes)")
    p.add_argument("--list", action="store_true", help="list the exercises and their functions, then stop")
    p.add_argument("--trace", action="store_true",
                   help="instead of a copy: run the suite once with every call of an exercise's function recorded, "
                        "and print which tests call which exercise and which markers they lack (minutes)")
    args = p.parse_args(argv)
    if args.list:
        for e in EXERCISES:
            print(f"{e.number:2d} {e.name:18s} {e.title}: "
                  f"{', '.join(f'{os.path.splitext(f)[0]}.{q}' for f, q in e.functions)}  [-m {e.marker}]")
        return 0
    exercises = select(args.exercises)
    if args.trace:
        return 1 if trace(ROOT, exercises) else 0
    if not args.out:
        p.error("OUT is required (or --list, --trace)")
    t0 = time.time()
    n = copy_repo(ROOT, args.out, exercises)
    functions = sum(len(e.functions) for e in exercises)
    print(f"wrote {args.out}: {n} files, {functions} functions of {len(exercises)} exercises stubbed "
          f"({', '.join(e.name for e in exercises)}) in {time.time() - t0:.1f} s")
    if not args.check:
        print(f"grade an exercise with: cd {args.out} && python -m pytest -m ex_<name>  (see course/README.md)")
        return 0
    problems, timings = check(ROOT, args.out, exercises)
    print("grading commands on the reference:")
    for e in exercises:
        print(f"  {e.number:2d}  python -m pytest -m {e.marker:22s} {timings[e.number]:4.0f} s")
    print(f"check took {time.time() - t0:.0f} s")
    if problems:
        print("check FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("check passed: the copy holds no answer, every exercise's tests pass on the reference and its checks fail "
          "on the student copy, and no other test breaks there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
