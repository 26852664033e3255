"""The documentation holds together: every page under docs/ is linked from the README, every
relative link points at a file (and a heading) that exists, and every flag a page shows on a
command line is one that command accepts (read from its ``--help``)."""
from __future__ import annotations

import functools
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCS = [ROOT / "README.md", *PAGES]

#: how a page names each command -> the argv that runs it
COMMANDS = {
    "engine.train": ["-m", "engine.train"], "engine.sample": ["-m", "engine.sample"],
    "engine.gradcheck": ["-m", "engine.gradcheck"], "engine.export": ["-m", "engine.export"],
    "bench.charrnn": ["-m", "bench.charrnn"], "bench.scaling": ["-m", "bench.scaling"],
    "bench.profile": ["-m", "bench.profile"], "tools/graph.py": ["tools/graph.py"],
    "tools/plot.py": ["tools/plot.py"], "tools/make_corpus.py": ["tools/make_corpus.py"],
    "tools/singa_data.py": ["tools/singa_data.py"], "tools/make_seqdata.py": ["tools/make_seqdata.py"],
}
CALL = re.compile(r"python3? (?:-m )?(" + "|".join(re.escape(c) for c in COMMANDS) + r")\b((?:\\\||[^`\n|])*)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set:
    return {anchor(line.lstrip("#")) for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert PAGES
    for page in PAGES:
        assert f"](docs/{page.name})" in readme, f"README does not link docs/{page.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, frag = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to missing {target}"
        if frag and path.suffix == ".md":
            assert frag in anchors(path), f"{doc.name}: link to missing heading {target}"


@functools.lru_cache(maxsize=None)
def help_text(command: str) -> str:
    run = subprocess.run([sys.executable, *COMMANDS[command], "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{command} --help: {run.stderr[-500:]}"
    return run.stdout


def documented_flags():
    found = {}
    for doc in DOCS:
        for command, rest in CALL.findall(doc.read_text(encoding="utf-8")):
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                found.setdefault((command, flag), doc.name)
    return sorted(found.items())


def test_the_pages_show_flags_at_all():
    flags = {f for (_, f), _ in documented_flags()}
    assert {"--resume", "--checkpoint", "--fold", "--workers"} <= flags


@pytest.mark.parametrize("call", documented_flags(), ids=lambda c: f"{c[0][0]} {c[0][1]}")
def test_every_documented_flag_exists(call):
    (command, flag), doc = call
    assert re.search(rf"(?<![\w-]){re.escape(flag)}\b", help_text(command)), \
        f"{doc} shows {command} {flag}, which {command} --help does not list"
