"""Print the requirements of ``ponder-serve`` with the given extras, one per line, read from pyproject.toml.

The Dockerfile installs these in a layer of their own before copying the code, so a code change rebuilds
only the small layer that installs the package itself (``pip install --no-deps .``).

    python deploy/requirements.py gateway > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF = re.compile(r"^ponder-serve\[(?P<extras>[^\]]+)\]$")


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The base dependencies plus those of ``extras``; self-references (``ponder-serve[x]``) are expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    found = list(project.get("dependencies", []))
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; known: {', '.join(sorted(optional))}")
        seen.add(extra)
        for requirement in optional[extra]:
            match = SELF.match(requirement.replace(" ", ""))
            if match:
                pending.extend(part.strip() for part in match["extras"].split(","))
            elif requirement not in found:
                found.append(requirement)
    return found


if __name__ == "__main__":
    print("\n".join(requirements(Path(__file__).resolve().parent.parent / "pyproject.toml", sys.argv[1:])))
