"""The structure holds: imports point down the layers, only commands parse arguments, files stay small.

Layers, top to bottom (a module may import its own package and anything below;
two packages on one layer stay out of each other):

    cli                      the ``pixart-tune`` entry: the table of verbs
    commands                 one module per verb: parse, call one library function, print
    app                      the Gradio app
    class_images             class images for prior preservation, drawn by the Sampler
    training | sampling      the trainer; sampling with adapters
    adapters | data          LoRA files and tools; dataset preparation and the cache
    generation               one generation path, grids, PNGs
    encoders                 the VAE and T5
    tiny                     the tiny pipeline (init-tiny)
    models | hub | tiny_vae  loading components; hub look-ups; the tiny pipeline's VAE
    parts                    where a model's transformer and components are
    base | config | fsutil   the vocabulary; typed configs; safe file writes;
    | family                 the model families (Sigma, alpha)
    errors | pixart_tune     the user-facing error; the version
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS: list[tuple[str, ...]] = [
    ("pixart_tune", "pixart_tune.errors"),
    ("pixart_tune.base", "pixart_tune.config", "pixart_tune.fsutil", "pixart_tune.family"),
    ("pixart_tune.parts",),
    ("pixart_tune.models", "pixart_tune.hub", "pixart_tune.tiny_vae"),
    ("pixart_tune.tiny",),
    ("pixart_tune.encoders",),
    ("pixart_tune.generation",),
    ("pixart_tune.adapters", "pixart_tune.data"),
    ("pixart_tune.training", "pixart_tune.sampling"),
    ("pixart_tune.class_images",),
    ("pixart_tune.app",),
    ("pixart_tune.commands",),
    ("pixart_tune.cli",),
]
MAX_LINES = 600
PACKAGE = REPO / "pixart_tune"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module: str) -> tuple[str, int]:
    """(the package or module a module belongs to, its layer): the longest listed prefix."""
    best = ("", -1, -1)
    for layer, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best[2]:
                best = (name, layer, len(name))
    if best[1] < 0:
        raise AssertionError(f"{module} is on no layer: add it to LAYERS in tests/test_architecture.py (and the README's module map)")
    return best[0], best[1]


def imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every pixart_tune import in a file's source, at module level and inside functions."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pixart_tune import x`` may name a module: count it as pixart_tune.x when it is one.
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                is_module = (REPO / Path(*target.split("."))).with_suffix(".py").is_file() or (REPO / Path(*target.split("."))).is_dir()
                found.append((node.lineno, target if is_module else node.module))
    return [(line, name) for line, name in found if name == "pixart_tune" or name.startswith("pixart_tune.")]


def violations(files: list[Path], sources: dict[Path, str] | None = None) -> list[str]:
    """``path:line imports X (above|beside group)`` for each import against the layers."""
    problems = []
    for path in files:
        group, layer = group_of(module_name(path))
        text = (sources or {}).get(path) or path.read_text()
        for line, target in imports(text):
            target_group, target_layer = group_of(target)
            if target_group == group or target_layer < layer:
                continue
            where = "above" if target_layer > layer else "beside"
            problems.append(f"{path.relative_to(REPO)}:{line} imports {target} ({where} {group})")
    return problems


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_point_down_the_layers():
    problems = violations(package_files())
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_only_commands_parse_arguments():
    offenders = []
    for path in package_files():
        if module_name(path).startswith("pixart_tune.commands"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) else []
            if "argparse" in names:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, "argparse outside pixart_tune/commands/: " + ", ".join(offenders)


def test_no_file_over_600_lines():
    files = [*package_files(), *sorted((REPO / "tests").rglob("*.py")), *sorted((REPO / "bench").rglob("*.py")), REPO / "app.py"]
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines (split them by what they are about): " + ", ".join(long)


@pytest.mark.parametrize(
    ("module", "imported", "expected"),
    [
        ("pixart_tune/training/validation.py", "from pixart_tune.sampling import generate", "beside"),
        ("pixart_tune/models.py", "from pixart_tune.commands.parsing import verb_parser", "above"),
        ("pixart_tune/encoders.py", "from pixart_tune.data.buckets import bucket_table", "above"),
        ("pixart_tune/data/cache.py", "from pixart_tune.adapters import lora", "beside"),
        ("pixart_tune/sampling.py", "from pixart_tune import adapters", None),
        ("pixart_tune/data/cache.py", "import pixart_tune.data.buckets", None),
        ("pixart_tune/training/validation.py", "from pixart_tune.generation import generate", None),
    ],
)
def test_the_check_catches_arrows_against_the_grain(module, imported, expected):
    """The checker on sources written for it: arrows that were once in the code, and allowed ones."""
    path = REPO / module
    problems = violations([path], {path: f"{imported}\n"})
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and f"({expected} " in problems[0], problems
