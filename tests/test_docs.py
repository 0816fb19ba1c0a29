import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [n for n in names if n.endswith((".py", ".md", ".sh", ".txt", ".ini", ".toml")) or n.startswith(".ci/")]


def test_nothing_in_the_project_points_outside_it():
    outside = re.compile(r"\.\./shared|\.\./\.\.|/work/|/tmp/i21")
    hits = [f"{name}:{i}" for name in tracked_text_files() if name != "tests/test_docs.py"
            for i, line in enumerate(open(os.path.join(ROOT, name), encoding="utf-8"), 1) if outside.search(line)]
    assert not hits


def test_every_file_the_readme_links_to_exists():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    links = re.findall(r"\]\(([^)#:]+)\)", readme)
    assert links and all(os.path.exists(os.path.join(ROOT, link)) for link in links)
