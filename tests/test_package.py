"""The package contract: cheap import, layers that do not reach sideways."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_cheap():
    code = "import sys, artquant; print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'comfy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _imports(folder: str) -> set[str]:
    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
    return names


def test_scorer_imports_none_of_its_siblings():
    imports = _imports("scorer")
    forbidden = ("artquant_nodes", "reward", "training", "diffusers", "comfy", "folder_paths", "accelerate")
    assert not [name for name in imports if any(part in name.split(".") for part in forbidden) or name.startswith("..")]


def test_only_the_nodes_touch_comfyui_and_only_reward_touches_diffusers():
    for folder in ("scorer", "training", "reward"):
        if (ROOT / folder).exists():
            assert not [n for n in _imports(folder) if n.split(".")[0] in ("comfy", "folder_paths", "nodes")], folder
    for folder in ("scorer", "training", "artquant_nodes"):
        if (ROOT / folder).exists():
            assert not [n for n in _imports(folder) if n.split(".")[0] == "diffusers"], folder
