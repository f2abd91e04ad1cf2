"""The course kit (course/README.md, course/make_student_copy.py, course/grade.py, course/assignment.ipynb), which
is instructor-only like the grading tests it checks (the student copy leaves this file out): every exercise's
function exists with a docstring, its markers are registered, its grading file and points are the sheet's; the
ast rewriting keeps decorators, signature and docstring and raises NotImplementedError naming the exercise; the
student copy holds no instructor's file and no answer (a reference body pasted anywhere is found); the grader gives
full points to the reference, 0 with one line per exercise to a fresh student copy, loses exactly a wrong
exercise's points, and reads no gradient, a loop over the batch, a file that does not import, an endless loop and
edited tests as it should. Each test names the bug it catches."""
import ast
import importlib.util
import inspect
import json
import os
import re
import shutil

import pytest
import torch

import simclr
from common import ROOT


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kit = load("make_student_copy", "course/make_student_copy.py")
grade = load("grade", "course/grade.py")


# ---- the kit's tables ----
def test_every_exercise_has_its_function_markers_grading_file_and_points():
    """Catches an exercise's function renamed or moved (the kit finds it by name), a docstring dropped (it is the
    student's specification), a marker missing from pytest.ini, a sheet without the check command or the section,
    a grading file missing, and a points table that names a grading test that does not exist or leaves one out
    (it would never count, or count for nothing)."""
    ini = open(os.path.join(ROOT, "pytest.ini")).read()
    sheet = open(os.path.join(ROOT, "course", "README.md")).read()
    assert [e.number for e in kit.EXERCISES] == list(range(1, len(kit.EXERCISES) + 1))
    assert "course/grading" in re.search(r"^testpaths\s*=(.*)$", ini, re.M).group(1).split()
    for e in kit.EXERCISES:
        for path, qualname in e.functions:
            fn = kit.find_function(ast.parse(open(os.path.join(ROOT, path)).read()), qualname)
            assert fn is not None, f"{path}: {qualname}"
            assert len(ast.get_docstring(fn) or "") > 80, f"{path}: {qualname} has no real docstring"
        for marker in (e.marker, e.needs_marker):
            assert re.search(rf"^\s+{marker}:", ini, re.M), marker
        assert f"python -m pytest -m {e.marker}" in sheet, e.marker
        assert re.search(rf"^## Exercise {e.number}\b", sheet, re.M), e.number
        tree = ast.parse(open(os.path.join(ROOT, grade.test_file(e))).read())
        tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
        grouped = [t for _, _, names, _ in grade.POINTS[e.number] for t in names]
        assert sorted(grouped) == sorted(tests), f"exercise {e.number}: the points table and {grade.test_file(e)}"
        groups = [g for g, _, _, _ in grade.POINTS[e.number]]
        assert all(set(needs) <= set(groups) for _, _, _, needs in grade.POINTS[e.number])


def test_the_sheets_points_are_the_graders():
    """Catches a sheet whose points table (what students are told) differs from what course/grade.py awards."""
    sheet = open(os.path.join(ROOT, "course", "README.md")).read()
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| ([^|]+?) \| (\d+) \|", sheet, re.M)
    table = {}
    for number, name, group, points in rows:
        table.setdefault(int(number), []).append((group.strip(), int(points)))
    assert table == {n: [(g, p) for g, p, _, _ in groups] for n, groups in grade.POINTS.items()}
    assert sum(p for groups in grade.POINTS.values() for _, p, _, _ in groups) + grade.WRITTEN[2] == 100


SAMPLE_SOURCE = '''import torch


# ---- loss ----
@torch.no_grad()
def f(x, y=2, *, z=None):
    """Docstring of f.

    Two paragraphs."""
    def inner(a):  # a helper that goes with the body
        return a + 1
    # the answer:
    return inner(x) * y
    # a trailing comment of the body


class Model:
    def forward(self, x, num_views=2):
        """Docstring of forward."""
        return x * num_views

    def other(self):
        return 3


def g():
    return 4
'''


def test_stub_source_keeps_signature_and_docstring_and_raises_naming_the_exercise():
    """Catches a rewrite that drops a decorator, changes a signature or a docstring, leaves part of the answer
    (a nested helper, a comment) behind, touches another function, or raises without naming the exercise."""
    stubbed = kit.stub_source(SAMPLE_SOURCE, {"f": "exercise 7: write m.f", "Model.forward": "exercise 8: write M"})
    assert "the answer" not in stubbed and "inner" not in stubbed and "trailing comment" not in stubbed
    assert "@torch.no_grad()\ndef f(x, y=2, *, z=None):" in stubbed and "# ---- loss ----" in stubbed
    namespace, reference = {}, {}
    exec(compile(stubbed, "<stubbed>", "exec"), namespace)
    exec(compile(SAMPLE_SOURCE, "<reference>", "exec"), reference)
    for get in (lambda ns: ns["f"], lambda ns: ns["Model"].forward):
        assert inspect.signature(get(namespace)) == inspect.signature(get(reference))
        assert get(namespace).__doc__ == get(reference).__doc__
    with pytest.raises(NotImplementedError, match="^exercise 7: write m.f$"):
        namespace["f"](1)
    with pytest.raises(NotImplementedError, match="^exercise 8: write M$"):
        namespace["Model"]().forward(1)
    assert namespace["Model"]().other() == 3 and namespace["g"]() == 4
    with pytest.raises(SystemExit, match="Model.other has no docstring"):
        kit.stub_source(SAMPLE_SOURCE, {"Model.other": "exercise 1: x"})
    with pytest.raises(SystemExit, match="no function h"):
        kit.stub_source(SAMPLE_SOURCE, {"h": "exercise 1: x"})


def test_student_copy_stubs_the_chosen_exercise_in_the_repository(tmp_path):
    """Catches a copy that stubs the wrong function or none, loses the docstring or signature of the real one,
    copies .git (its history holds the reference) or an instructor's file (the answer key, the grading tests, the
    grader, this file), has no banner, or overwrites a folder it did not make."""
    out = tmp_path / "student"
    kit.main([str(out), "--exercises", "simclr_loss"])
    assert not (out / ".git").exists() and (out / "tests" / "data_sample").is_dir()
    assert (out / "course" / "README.md").exists() and (out / "course" / "make_student_copy.py").exists()
    for f in ("course/instructor_notes.md", "course/grade.py", "course/answer_runs.py", "course/grading",
              "tests/test_course.py"):
        assert not (out / f).exists(), f
    assert (tmp_path / "reference").exists() is False and kit.copy_repo(ROOT, str(tmp_path / "reference"), []) > 0
    assert (tmp_path / "reference" / "course" / "grading" / "grading_checks.py").exists()  # the reference: all
    assert "python -m pytest -m ex_simclr_loss" in (out / "README.md").read_text()
    copy_spec = importlib.util.spec_from_file_location("student_simclr", out / "simclr.py")
    student = importlib.util.module_from_spec(copy_spec)
    copy_spec.loader.exec_module(student)
    assert inspect.signature(student.nt_xent_loss) == inspect.signature(simclr.nt_xent_loss)
    assert student.nt_xent_loss.__doc__ == simclr.nt_xent_loss.__doc__
    with pytest.raises(NotImplementedError, match="^exercise 3: write simclr.nt_xent_loss"):
        student.nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), 0.5)
    assert student.cosine_schedule(5, 100, 10, 1.0) == simclr.cosine_schedule(5, 100, 10, 1.0)  # the rest: as is
    for path, _ in kit.EXERCISES[3].functions:  # another exercise's file: byte for byte
        assert (out / path).read_bytes() == open(os.path.join(ROOT, path), "rb").read()
    kit.main([str(out), "--exercises", "4"])  # its own copy it may replace ...
    assert "exercise 4: write eval_linear.knn_classify" in (out / "eval_linear.py").read_text()
    assert (out / "simclr.py").read_bytes() == open(os.path.join(ROOT, "simclr.py"), "rb").read()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a student copy"):  # ... a folder of someone else's never
        kit.main([str(tmp_path / "mine")])
    with pytest.raises(SystemExit, match="unknown exercise"):
        kit.main([str(out), "--exercises", "nope"])


# ---- no answer in the student copy ----
@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("copy") / "student"
    kit.copy_repo(ROOT, str(out), kit.select(None))
    return out


def test_the_student_copy_holds_no_reference_body(student_copy):
    """Catches an answer left in the copy: an exercise's body written out elsewhere (dino.ema_update was moco's
    and byol's answer), in a docstring (the EMA loop was in ema_update's), a comment or a test. The only overlap
    allowed is the one ALLOWED_OVERLAPS explains."""
    leaks, allowed = kit.find_answers(ROOT, str(student_copy), kit.select(None))
    assert leaks == []
    assert all(line.startswith("data.py (byol_specs)") for line in allowed)


@pytest.mark.parametrize("where", ["docstring", "comment", "module comment", "markdown", "notebook", "other function",
                                   "renamed variables"])
def test_a_reference_body_pasted_anywhere_is_found(student_copy, tmp_path, where):
    """Catches a search that misses a body because it was re-indented, re-wrapped, put in a docstring, a comment
    (in a function or at module level), a markdown file or a notebook cell, written out in another function, or
    written out with its variables renamed."""
    out = tmp_path / "copy"
    shutil.copytree(student_copy, out)
    source = open(os.path.join(ROOT, "simclr.py")).read()
    fn = kit.find_function(ast.parse(source), "nt_xent_loss")
    body = source.splitlines()[kit._docstring_node(fn).end_lineno:fn.end_lineno]
    signature = "def helper(z1, z2, temperature, z1_all=None, z2_all=None, rank=0):\n"
    if where == "docstring":
        path, text = "vit.py", '"""' + "\n".join(line.strip() for line in body) + '"""\n'
    elif where == "comment":
        path, text = "vit.py", "def helper():\n" + "\n".join("    #   " + line for line in body) + "\n    return 1\n"
    elif where == "module comment":
        path, text = "vit.py", "\n".join("#   " + line for line in body) + "\n"
    elif where == "markdown":
        path, text = "docs/answers.md", "```python\n" + " ".join(line.strip() for line in body) + "\n```\n"
    elif where == "notebook":
        path, text = "course/answers.ipynb", json.dumps({"cells": [{"cell_type": "code", "source": body}]})
    elif where == "other function":
        path, text = "vit.py", signature + "\n".join(body) + "\n"
    else:
        names = {"anchors": "a", "candidates": "c", "logits": "s", "self_idx": "me", "partner_idx": "other", "idx": "j",
                 "temperature": "tau", "z1_all": "all1", "z2_all": "all2", "z1": "u", "z2": "v", "B": "n", "G": "m",
                 "rank": "r"}
        renamed = re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: names[m.group(1)], "\n".join(body))
        assert renamed != "\n".join(body)
        path, text = "vit.py", "def helper(u, v, tau, all1=None, all2=None, r=0):\n" + renamed + "\n"
    with open(out / path, "a") as f:
        f.write(text)
    leaks, _ = kit.find_answers(ROOT, str(out), kit.select(None))
    assert any(line.startswith(path) and "simclr.nt_xent_loss" in line for line in leaks), leaks


# ---- the grader ----
def submission(root, name, files):
    """A student's folder holding `files` ({path: source}, the reference's file where source is None)."""
    for path, source in files.items():
        os.makedirs(os.path.dirname(root / name / path), exist_ok=True)
        text = open(os.path.join(ROOT, path)).read() if source is None else source
        (root / name / path).write_text(text)


def edited(path, old, new):
    source = open(os.path.join(ROOT, path)).read()
    assert source.count(old) == 1, old
    return source.replace(old, new)


def stubbed(path, qualname, number):
    return kit.stub_source(open(os.path.join(ROOT, path)).read(),
                           {qualname: f"exercise {number}: write {qualname} (see course/README.md)"})


def run_grader(root, exercises, capsys, timeout=60):
    out = root / "results.json"
    assert grade.main([str(root / "students"), "--exercises", *exercises, "--timeout", str(timeout),
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    return json.loads(out.read_text()), printed


def scores(report):
    """{exercise number: (points, max)} and {test group name: points} of one student's results.json."""
    by_exercise, by_group = {}, {}
    for t in report["tests"]:
        number = int(t["name"].split()[0])
        got, top = by_exercise.get(number, (0, 0))
        by_exercise[number] = (got + t["score"], top + t["max_score"])
        by_group[t["name"]] = t["score"]
    return by_exercise, by_group


def test_grader_full_points_zero_for_a_stub_and_a_wrong_exercise_loses_only_its_own(tmp_path, capsys):
    """Catches a grader that does not give the reference every point, gives a fresh student copy any point or
    more than one line per exercise, or lets a wrong exercise cost another exercise's points (a wrong loss
    graded together with the loop of exercise 2). Also Gradescope's format: a score, and tests named
    '<number> <exercise>: <group>' with score, max_score and output."""
    submission(tmp_path / "students", "reference", {"simclr.py": None, "course/naive.py": None})
    submission(tmp_path / "students", "stub", {"simclr.py": stubbed("simclr.py", "nt_xent_loss", 3),
                                               "course/naive.py": stubbed("course/naive.py", "nt_xent_loss_naive", 2)})
    submission(tmp_path / "students", "wrong", {
        "simclr.py": edited("simclr.py", "logits = anchors @ candidates.T / temperature",
                            "logits = anchors @ candidates.T"),
        "course/naive.py": None})
    results, printed = run_grader(tmp_path, ["2", "3"], capsys)
    full = {2: (6, 6), 3: (12, 12)}
    assert scores(results["reference"])[0] == full and results["reference"]["score"] == 18
    assert scores(results["stub"])[0] == {2: (0, 6), 3: (0, 12)} and results["stub"]["score"] == 0
    assert scores(results["wrong"])[0] == {2: (6, 6), 3: (0, 12)}
    stub_lines = [line for line in printed[printed.index("stub:"):printed.index("total", printed.index("stub:"))]
                  .splitlines()[1:] if line.strip()]
    assert len(stub_lines) == 2 and all(re.search(rf"^\s+{n}\s.*0 / \d+ .*not written: NotImplementedError: "
                                                  rf"exercise {n}: write", line)
                                        for n, line in zip((2, 3), stub_lines)), stub_lines
    for t in results["reference"]["tests"]:
        assert re.match(r"^[23] simclr_loss(_naive)?: \w+$", t["name"]) and t["score"] == t["max_score"] > 0, t
        assert set(t) == {"name", "score", "max_score", "output"}


def test_grader_reads_the_concept_not_only_the_value(tmp_path, capsys):
    """Catches a grader that gives an NT-Xent without gradient (computed under no_grad) its gradient points, a
    Python loop over the batch its vectorized points, a fast wrong loss its vectorized points, or a group's points
    to a loss that fails only some of its cases (here: wrong at temperature 1.0 only)."""
    no_grad = edited("simclr.py", "def nt_xent_loss(", "@torch.no_grad()\ndef nt_xent_loss(")
    loop = edited("simclr.py", "    if z1_all is None:\n        z1_all, z2_all = z1, z2\n",
                  "    if z1_all is None and len(z1) > 1:  # one image at a time, against all candidates\n"
                  "        return sum(nt_xent_loss(z1[i:i + 1], z2[i:i + 1], temperature, z1, z2, rank=i)\n"
                  "                   for i in range(len(z1))) / len(z1)\n"
                  "    if z1_all is None:\n        z1_all, z2_all = z1, z2\n")
    one_case = edited("simclr.py", "logits = anchors @ candidates.T / temperature",
                      "logits = anchors @ candidates.T / (temperature if temperature != 1.0 else 0.5)")
    for name, source in (("no_grad", no_grad), ("loop", loop), ("one_case", one_case)):
        submission(tmp_path / "students", name, {"simclr.py": source})
    results, _ = run_grader(tmp_path, ["3"], capsys)
    _, no_grad_groups = scores(results["no_grad"])
    assert no_grad_groups["3 simclr_loss: value"] == 4 and no_grad_groups["3 simclr_loss: gradient"] == 0
    _, loop_groups = scores(results["loop"])
    assert loop_groups == {"3 simclr_loss: value": 4, "3 simclr_loss: gradient": 4, "3 simclr_loss: vectorized": 0,
                           "3 simclr_loss: processes": 2}
    assert "not vectorized" in next(t["output"] for t in results["loop"]["tests"] if t["name"].endswith("vectorized"))
    _, one_case_groups = scores(results["one_case"])
    assert one_case_groups["3 simclr_loss: value"] == 0 and one_case_groups["3 simclr_loss: gradient"] == 0
    assert re.search(r"^1 of \d+ tests failed", next(t["output"] for t in results["one_case"]["tests"]
                                                     if t["name"].endswith("value")))


def test_grader_survives_a_file_that_does_not_import_an_endless_loop_and_edited_tests(tmp_path, capsys):
    """Catches a grader that crashes or hangs on a submission that does not import or loops forever (each gets
    0 with a one-line reason, the next student is still graded), that leaves a student's broken file in place for
    the next exercise (exercise 2's grading imports simclr.py, which imports data.py: a data.py that does not
    import would cost exercise 2 too), and one that lets a student's own tests, conftest.py or pytest.ini count
    (an edited copy of the grading tests that passes anything)."""
    naive = "course/naive.py"
    header = "def nt_xent_loss_naive(z1, z2, temperature):"
    submission(tmp_path / "students", "a_syntax_error", {naive: edited(naive, header, header[:-1])})
    submission(tmp_path / "students", "b_endless", {naive: edited(naive, "    n = len(views)\n",
                                                                  "    while True:\n        pass\n")})
    cheat = {naive: edited(naive, "    return torch.tensor(total / n)", "    return torch.tensor(0.0)"),
             "conftest.py": "import pytest\n\n\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_call(item):\n"
                            "    yield\n", "pytest.ini": "[pytest]\naddopts = -p no:terminal\n"}
    cheat["course/grading/test_ex02_simclr_loss_naive.py"] = "def test_value_matches_algorithm_1():\n    pass\n"
    submission(tmp_path / "students", "c_edited_tests", cheat)
    submission(tmp_path / "students", "d_reference", {naive: None})
    submission(tmp_path / "students", "e_broken_data", {naive: None, "data.py": "import torch\nraise RuntimeError"})
    results, printed = run_grader(tmp_path, ["1", "2"], capsys, timeout=20)
    assert results["a_syntax_error"]["score"] == 0 and "does not import: SyntaxError" in printed
    assert results["b_endless"]["score"] == 0 and "stopped after the time limit of 20 s" in printed
    endless = re.search(r"^\s+2\s+simclr_loss_naive\s+0 / 6\s+\((\d+) s\)\s+stopped", printed, re.M)
    assert endless and int(endless.group(1)) < 20 + 15, printed  # stopped at the limit, not when it chose to
    assert results["c_edited_tests"]["score"] == 0 and results["d_reference"]["score"] == 6
    assert scores(results["e_broken_data"])[0] == {1: (0, 8), 2: (6, 6)}
    assert "does not import: RuntimeError" in printed and "not submitted: data.py missing" in printed
    assert all(len(t["output"].splitlines()) == 1 for r in results.values() for t in r["tests"])


def test_grader_refuses_a_student_copy_and_a_folder_without_exercises(tmp_path, monkeypatch):
    """Catches a grader that runs without its grading tests (from a student copy: every grade would be 0) or
    on a folder that holds no submission, instead of saying so in one line."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no exercise file"):
        grade.main([str(tmp_path / "empty")])
    monkeypatch.setattr(grade, "ROOT", str(tmp_path))
    with pytest.raises(SystemExit, match="grade from the instructor's repository"):
        grade.main([str(tmp_path / "empty")])


# ---- the notebook ----
def test_the_notebook_is_committed_without_outputs():
    """Catches a notebook committed with its outputs (a student would see another run's results as theirs, and
    the diffs would be megabytes) or one that writes an exercise's function itself."""
    nb = json.load(open(os.path.join(ROOT, "course", "assignment.ipynb")))
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code and all(not cell["outputs"] and cell["execution_count"] is None for cell in code)
    source = "\n".join("".join(cell["source"]) for cell in code)
    for e in kit.EXERCISES:  # the notebook calls the exercises' functions, it never writes one
        for _, qualname in e.functions:
            assert not re.search(rf"^\s*def {qualname.split('.')[-1]}\(", source, re.M), qualname


def test_the_notebook_runs_on_a_student_copy_with_the_reference_filled_in(tmp_path):
    """Catches a notebook that does not run from set-up to the last cell where students run it (a student copy's
    layout, no instructor's file, every exercise written: the reference): a check or a run that fails, a helper
    that calls something the copy lacks, an exercise whose check cell shows no passing report (each named).
    COURSE_QUICK=1 shortens its training runs to one epoch of a tenth of the sample (a few minutes of CPU)."""
    import nbclient  # requirements-dev.txt
    import nbformat
    out = tmp_path / "copy"
    kit.copy_repo(ROOT, str(out), [], instructor=False)
    assert not (out / "course" / "grading").exists() and (out / "course" / "assignment.ipynb").exists()
    nb = nbformat.read(str(out / "course" / "assignment.ipynb"), as_version=4)
    os.environ["COURSE_QUICK"] = "1"  # the kernel inherits it
    try:
        # iopub_timeout: how long a cell's printed output may trail the cell's end. nbclient's default (4 s) drops
        # what comes later, with only a log line: the likely way one check's report went missing in a run here.
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", iopub_timeout=60,
                                raise_on_iopub_timeout=True,
                                resources={"metadata": {"path": str(out / "course")}}).execute()
    finally:
        del os.environ["COURSE_QUICK"]
    text = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    checks = {m.group(1): "".join(o.get("text", "") for o in cell.outputs) for cell in nb.cells
              if cell.cell_type == "code" for m in re.finditer(r'^check\("(\w+)"\)', cell.source, re.M)}
    assert sorted(checks) == sorted(e.name for e in kit.EXERCISES)  # every exercise's checks, each once
    for name, output in checks.items():  # each one's own report, so that a failure names the exercise
        assert " passed" in output and " failed" not in output and " error" not in output, (name, output)
    for script in ("simclr.py", "moco.py", "byol.py", "swav.py", "dino.py"):
        assert f"$ {script} --dataset folder" in text
        assert (out / "runs" / "notebook" / script[:-3] / "log.jsonl").exists()
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)  # the views, the curves
