"""The README tells the truth: every line count in its file table equals its file's, and its claims table is
the one results/compare.py makes from the measured runs.

    python -m pytest -q tests/test_readme.py
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_line_counts_in_the_file_table():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", readme, re.MULTILINE)  # | `file` | lines | ...
    assert len(rows) >= 7, "the file table lists the six stage files and paper.md"
    for name, lines in rows:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert int(lines) == len(f.read().splitlines()), f"README says {name} has {lines} lines"


def test_claims_table_is_the_compare_output():
    """The README's claims table is results/compare.py --claims on results/ablation.jsonl, byte for byte."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = re.search(r"^\| claim \| verdict \|.*?\n(?=\n)", readme, re.MULTILINE | re.DOTALL).group(0)
    p = subprocess.run([sys.executable, "results/compare.py", "results/ablation.jsonl", "--claims"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout == table, p.stderr or p.stdout
