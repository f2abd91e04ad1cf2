"""Grade students' exercises with the instructor's tests (course/grading/): a table of points per exercise and,
with --json, Gradescope's results.json. Instructor-only (a student copy leaves it out, with the grading tests).

    python course/grade.py SUBMISSION                          # one student's folder (their copy of the repository)
    python course/grade.py SUBMISSIONS                         # a folder of such folders, one per student
    python course/grade.py SUBMISSION --json results.json      # and Gradescope's results.json
    python course/grade.py SUBMISSION --exercises 3 knn --timeout 120

Each exercise is graded on its own: a fresh copy of this repository gets the student's files that hold the
exercise's functions (data.py for exercise 1, course/naive.py for 2, ...; nothing else of the submission: edited
tests, conftest.py or pytest.ini do not count) and runs course/grading/test_exNN_<name>.py there, with a time limit.
So a wrong exercise costs its own points only: another exercise's grade runs with the reference of this one.
Each exercise's points are split into groups of tests (POINTS, the sheet's "How you are graded" table); a group
scores its points when every one of its tests passes (and the groups it needs pass: a fast wrong loss earns no
"vectorized" points), else 0. An exercise that does not import, raises, or runs
past the time limit scores 0 with a one-line reason; the grader itself never stops on a submission.

Gradescope: results.json has the total `score` and one entry per test group, named "<number> <exercise>: <group>"
(e.g. "3 simclr_loss: gradient") with its score, max_score and a one-line output. As an autograder, the
instructor's repository is the source and `run_autograder` calls
`python course/grade.py /autograder/submission --json /autograder/results/results.json` (course/README.md).
With a folder of folders, --json writes {student folder: results} for all of them.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_student_copy as kit  # noqa: E402

ROOT = kit.ROOT
GRADING = kit.GRADING

# exercise number: [(group, points, its test functions in course/grading/test_exNN_<name>.py, the groups it needs)]:
# the sheet's table. A group scores when all its tests pass and so do the groups it needs: being vectorized or
# consistent across processes earns nothing for a wrong value.
POINTS = {
    1: [("fields", 5, ["test_fields_are_the_papers_recipe"], ()),
        ("views", 3, ["test_views_show_the_papers_statistics"], ())],
    2: [("value", 4, ["test_value_matches_algorithm_1"], ()),
        ("collapse", 2, ["test_value_at_collapse"], ())],
    3: [("value", 4, ["test_value_matches_algorithm_1", "test_value_at_collapse_and_for_orthogonal_images"], ()),
        ("gradient", 4, ["test_gradient_matches_autograd_of_algorithm_1"], ()),
        ("vectorized", 2, ["test_is_vectorized_over_the_batch"], ("value",)),
        ("processes", 2, ["test_rank_offset_loss_equals_whole_batch_loss"], ("value",))],
    4: [("value", 5, ["test_scores_match_a_slow_loop"], ()),
        ("weights", 3, ["test_hand_computed_weights_beat_the_majority",
                        "test_top5_gives_no_credit_to_classes_without_a_vote"], ()),
        ("vectorized", 2, ["test_is_vectorized_over_the_test_points"], ("value",))],
    5: [("loss value", 3, ["test_loss_matches_algorithm_1", "test_loss_at_collapse_and_with_rank_offsets"], ()),
        ("loss gradient", 2, ["test_gradient_matches_autograd_of_algorithm_1"], ()),
        ("vectorized", 1, ["test_loss_is_vectorized_over_the_batch"], ("loss value",)),
        ("momentum update", 2, ["test_ema_update_is_exact_and_leaves_buffers_alone"], ()),
        ("forward", 2, ["test_queries_and_keys_come_from_the_modules_algorithm_1_names"], ()),
        ("training step", 2, ["test_train_one_epoch_learns_and_the_momentum_encoder_follows_by_ema"], ())],
    6: [("loss value", 3, ["test_loss_is_the_normalized_mse_of_eq_2", "test_loss_range_and_fixed_points"], ()),
        ("loss gradient", 2, ["test_gradient_matches_autograd_of_eq_2"], ()),
        ("vectorized", 1, ["test_loss_is_vectorized_over_the_batch"], ("loss value",)),
        ("target update", 2, ["test_ema_update_is_exact_and_leaves_buffers_alone"], ()),
        ("forward", 2, ["test_predictions_and_targets_come_from_the_modules_the_paper_names"], ()),
        ("training step", 2, ["test_train_one_epoch_learns_and_the_target_follows_by_ema"], ())],
    7: [("value", 4, ["test_codes_match_algorithm_1"], ()),
        ("precision", 2, ["test_precision_on_a_clustered_batch"], ()),
        ("assignments", 2, ["test_codes_are_assignments_with_equipartition"], ()),
        ("vectorized", 2, ["test_is_vectorized_over_the_batch"], ("value",)),
        ("processes", 2, ["test_two_processes_equal_one_process"], ("value",))],
    8: [("value", 4, ["test_value_matches_the_formula"], ()),
        ("gradient", 2, ["test_gradient_matches_autograd_of_the_formula"], ()),
        ("vectorized", 1, ["test_is_vectorized_over_the_batch"], ("value",)),
        ("collapse", 1, ["test_collapse_costs_ln_k"], ())],
    9: [("loss value", 3, ["test_loss_matches_algorithm_1", "test_loss_value_is_float64s_at_the_default_sizes"], ()),
        ("loss gradient", 2, ["test_gradient_matches_autograd_of_algorithm_1"], ()),
        ("vectorized", 1, ["test_loss_and_centre_are_vectorized_over_the_batch"], ("loss value", "centre")),
        ("collapse and sharpening", 2, ["test_collapse_values_and_sharpening"], ()),
        ("centre", 2, ["test_center_is_an_ema_of_the_teachers_batch_mean"], ()),
        ("teacher update", 2, ["test_teacher_ema_update_is_exact_and_leaves_buffers_alone"], ())],
}
WRITTEN = (10, "reading a collapsed run", 8)  # exercise 10: written, graded by hand
TIMEOUT = 300  # seconds per exercise: its grading tests take 10-60 s on a busy 2-core CPU


def test_file(e):
    return os.path.join(GRADING, f"test_ex{e.number:02d}_{e.name}.py")


def exercise_files(e):
    return sorted({path for path, _ in e.functions})


def max_points(e):
    return sum(group[1] for group in POINTS[e.number])


# ---- finding submissions ----
def holds_exercises(folder):
    return any(os.path.isfile(os.path.join(folder, f)) for e in kit.EXERCISES for f in exercise_files(e))


def submission_root(folder):
    """`folder` if it holds an exercise file, else its only subfolder that does (a repository uploaded inside a
    folder), else None."""
    if holds_exercises(folder):
        return folder
    inner = [os.path.join(folder, d) for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))
             and not d.startswith(".")]
    inner = [d for d in inner if holds_exercises(d)]
    return inner[0] if len(inner) == 1 else None


def find_submissions(path):
    """[(student name, folder or None)]: one for a student's folder, one per subfolder for a folder of folders."""
    if not os.path.isdir(path):
        raise kit.KitError(f"{path} is not a folder")
    root = submission_root(path)
    if root:
        return [(os.path.basename(os.path.abspath(path)), root)]
    students = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")]
    if not students:
        raise kit.KitError(f"{path} holds no exercise file ({', '.join(exercise_files(kit.EXERCISES[0]))}, ...) and "
                           f"no student folders")
    return [(d, submission_root(os.path.join(path, d))) for d in students]


# ---- running one exercise's grading tests ----
def last_error_line(text):
    """The line that says what went wrong in a pytest report: its last 'E   ...' line, else its last line."""
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ") and line[1:].strip()]
    if not lines:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def run_grading(copy, e, timeout):
    """pytest on exercise e's grading file in `copy`. Returns ({test function: [(passed, message)]}, problem):
    problem is a one-line reason when the file did not run at all (no import, time limit), else None."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "results.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file(e), f"--junitxml={xml}",
               "-o", "junit_family=xunit1"]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: a time limit stops its children too
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {}, f"stopped after the time limit of {timeout:.0f} s (an endless loop, or far too slow)"
        if not os.path.exists(xml):
            return {}, f"the grading tests did not run: {last_error_line(out)}"
        results = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = next((c for c in case if c.tag in ("failure", "error")), None)
            if bad is not None and not case.get("classname"):  # the test file could not be imported
                return {}, f"does not import: {last_error_line(bad.text or bad.get('message') or '')}"
            message = "" if bad is None else (bad.get("message") or "").strip() or last_error_line(bad.text or "")
            skipped = any(c.tag == "skipped" for c in case)
            results.setdefault(case.get("name").split("[")[0], []).append(
                (bad is None and not skipped, "skipped" if skipped else message.splitlines()[0] if message else ""))
        if not results:
            return {}, f"the grading tests did not run: {last_error_line(out)}"
        return results, None


def why(message):
    """A failing test's message as the grade's one-line reason."""
    if "NotImplementedError" in message:
        return "not written: " + message[message.index("NotImplementedError"):]
    return message


def grade_exercise(copy, folder, e, timeout):
    """Exercise e of the submission in `folder`, run in the reference copy `copy` (left as it was found). Returns
    [(group, score, max score, output, reason)]: output says how its tests went, reason (None when full) why it
    lost its points, in one line."""
    groups = POINTS[e.number]
    missing = [f for f in exercise_files(e) if folder is None or not os.path.isfile(os.path.join(folder, f))]
    problem = f"not submitted: {', '.join(missing)} missing" if missing else None
    if not problem:
        for f in exercise_files(e):
            shutil.copyfile(os.path.join(folder, f), os.path.join(copy, f))
        try:
            results, problem = run_grading(copy, e, timeout)
        finally:
            for f in exercise_files(e):
                shutil.copyfile(os.path.join(ROOT, f), os.path.join(copy, f))
    if problem:
        return [(group, 0, points, problem, problem) for group, points, _, _ in groups]
    rows, passed = [], set()
    for group, points, tests, needs in groups:
        cases = [case for t in tests for case in results.get(t, [])]
        failed = [message for ok, message in cases if not ok]
        if not cases:
            rows.append((group, 0, points, "no grading test ran", "no grading test ran"))
        elif failed:
            rows.append((group, 0, points, f"{len(failed)} of {len(cases)} tests failed: {why(failed[0])}",
                         why(failed[0])))
        elif not set(needs) <= passed:
            reason = f"its tests passed, but it counts only with {' and '.join(needs)}"
            rows.append((group, 0, points, f"{len(cases)} tests passed; {reason}", reason))
        else:
            rows.append((group, points, points, f"{len(cases)} tests passed", None))
            passed.add(group)
    return rows


def grade(folder, exercises, timeout, show=print):
    """{exercise number: rows of grade_exercise} for the submission in `folder` (None: nothing submitted)."""
    grades = {}
    with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
        copy = os.path.join(tmp, "repo")
        kit.copy_repo(ROOT, copy, [])  # the instructor's repository, grading tests included
        for e in exercises:
            t0 = time.time()
            grades[e.number] = grade_exercise(copy, folder, e, timeout)
            show(line(e, grades[e.number], time.time() - t0))
    return grades


# ---- reports ----
def line(e, rows, seconds=None):
    """One line of the table: the exercise's points and, where it lost some, why (once, if every group lost them
    for the same reason)."""
    score, top = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lost = [(group, reason) for group, s, m, _, reason in rows if s < m]
    if len({reason for _, reason in lost}) == 1 and len(lost) == len(rows):
        reasons = lost[0][1]
    else:
        reasons = "; ".join(f"{group}: {reason}" for group, reason in lost)
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    return f"{e.number:3d}  {e.name:18s} {score:3d} / {top:<3d}{took}  {reasons}".rstrip()


def total(grades):
    return sum(r[1] for rows in grades.values() for r in rows), sum(r[2] for rows in grades.values() for r in rows)


def gradescope(grades, exercises):
    """Gradescope's results.json for one student."""
    tests = [{"name": f"{e.number} {e.name}: {group}", "score": score, "max_score": top, "output": output}
             for e in exercises for group, score, top, output, _ in grades[e.number]]
    score, top = total(grades)
    return {"score": score, "output": f"{score} / {top} points from the exercises' code; exercise {WRITTEN[0]} "
                                      f"({WRITTEN[1]}, {WRITTEN[2]} points) is graded by hand.", "tests": tests}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("submission", help="a student's folder, or a folder of students' folders")
    p.add_argument("--json", metavar="PATH", help="write Gradescope's results.json here")
    p.add_argument("--exercises", nargs="+", metavar="NAME", help="exercise names or numbers (default: all)")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per exercise (default: %(default)s)")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(ROOT, GRADING)):
        raise kit.KitError(f"no {GRADING} in {ROOT}: grade from the instructor's repository, not a student copy")
    exercises = kit.select(args.exercises)
    students = find_submissions(args.submission)
    results = {}
    for name, folder in students:
        print(f"{name}: {folder or 'no exercise file found'}", flush=True)
        grades = grade(folder, exercises, args.timeout, show=lambda s: print(s, flush=True))
        score, top = total(grades)
        print(f"     {'total':18s} {score:3d} / {top}  (+ exercise {WRITTEN[0]}, written: {WRITTEN[2]} points, "
              f"graded by hand)\n", flush=True)
        results[name] = (grades, gradescope(grades, exercises))
    if len(students) > 1:
        print("student".ljust(24) + "".join(f"{e.number:>4d}" for e in exercises) + "  total")
        for name, (grades, _) in results.items():
            print(name[:23].ljust(24) + "".join(f"{sum(r[1] for r in grades[e.number]):4d}" for e in exercises)
                  + f"  {total(grades)[0]:3d} / {total(grades)[1]}")
    if args.json:
        payload = (next(iter(results.values()))[1] if len(students) == 1 else
                   {name: report for name, (_, report) in results.items()})
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
