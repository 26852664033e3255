"""The quick start gives a new user the picture of the learning curve and says where it is.

tools/quickstart.sh trains, then plots metrics.png: its set-up must install what the plot
needs (an extra of pyproject.toml that brings matplotlib), and both the script's last
words and the README's quick start must say where the picture is. (The script itself is
run end to end by hand in a fresh clone and virtualenv: it installs packages and trains
for a minute.)
"""
from __future__ import annotations

import re
import tomllib

from charjobs import ROOT

SCRIPT = (ROOT / "tools" / "quickstart.sh").read_text(encoding="utf-8")
PICTURE = "workspace/char-rnn-small/metrics.png"


def installed_extras() -> set[str]:
    """The extras of this package that the script's pip install lines ask for."""
    extras = set()
    for line in SCRIPT.splitlines():
        if re.search(r"\bpip install\b", line) and not line.lstrip().startswith("#"):
            for group in re.findall(r"\.\[([\w,-]+)\]", line):
                extras.update(group.split(","))
    return extras


def test_quickstart_installs_what_the_plot_needs():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = meta["project"]["optional-dependencies"]
    wanted = installed_extras()
    assert wanted, "the quick start installs the package without any extra"
    reqs = [r for name in wanted for r in extras[name]]
    assert any(re.match(r"matplotlib\b", r) for r in reqs), (wanted, reqs)


def test_quickstart_and_readme_say_where_the_picture_is():
    assert PICTURE in SCRIPT.split("python -m engine.train", 1)[1]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert PICTURE in quick
