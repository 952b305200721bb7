"""What a fresh environment has: every import the project makes is a declared dependency.

CI installs into a brand-new virtual environment, so an undeclared import fails
there too; this test names the culprit at once, on any machine, even one where the
package happens to be installed by hand.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.conftest import REPO

SOURCES = ["pixart_tune", "tests", "bench", "app.py"]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_normalise(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def imported_top_level_names() -> dict[str, str]:
    """Top-level module -> first file importing it, for imports at module level and inside functions."""
    local = {p.name for p in REPO.iterdir() if p.is_dir()} | {p.stem for p in REPO.glob("*.py")}
    found: dict[str, str] = {}
    files = [f for s in SOURCES for f in ((REPO / s).rglob("*.py") if (REPO / s).is_dir() else [REPO / s])]
    for path in sorted(files):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def undeclared(imports: dict[str, str]) -> list[str]:
    """The imports (module -> file) that no distribution declared in pyproject.toml provides."""
    declared = declared_distributions()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, first_file in sorted(imports.items()):
        distributions = {_normalise(d) for d in providers.get(module, [])}
        if not distributions & declared:
            missing.append(f"{module} (first in {first_file}; provided by {sorted(distributions) or 'nothing installed'})")
    return missing


def test_every_import_is_a_declared_dependency():
    missing = undeclared(imported_top_level_names())
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_the_check_catches_an_undeclared_import():
    # scikit-image was once imported by a test and installed on one machine only;
    # PIL and yaml are declared under other names (pillow, pyyaml).
    missing = undeclared({"skimage": "t.py", "PIL": "t.py", "yaml": "t.py"})
    assert len(missing) == 1 and missing[0].startswith("skimage (first in t.py"), missing
