"""The README's file table tells the truth: every line count in it equals its file's.

    python -m pytest -q tests/test_readme.py
"""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_line_counts_in_the_file_table():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", readme, re.MULTILINE)  # | `file` | lines | ...
    assert len(rows) >= 7, "the file table lists the six stage files and paper.md"
    for name, lines in rows:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert int(lines) == len(f.read().splitlines()), f"README says {name} has {lines} lines"
