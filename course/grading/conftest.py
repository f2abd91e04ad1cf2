"""The grading tests run from the repository's root, as the whole suite does (pytest.ini's testpaths), and in a
fresh reference copy when course/grade.py grades a submission. They borrow the helpers of tests/ (the shipped
sample, the measurements of augmented views, the batches of scores) by putting tests/ on the import path."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests"))
