"""The code's layering, read from its source: the library (models, data, world, analysis,
training) takes no configs and imports no recipe, analysis does not lean on training, the
real-data scorer does not lean on the Shapes world, and PyTorch hooks are registered in one place
(LanguageModel.hooks), which is also the only code that reaches into the Hugging Face model."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("models", "data", "world", "analysis", "training")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """Every mmn module a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("mmn.")}


def project_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


GRAPH = {module_name(path): imports_of(path) for path in project_files("mmn")}


def test_the_import_graph_is_what_the_test_reads():
    assert len(GRAPH) > 40 and "mmn.recipes.run" in GRAPH and "mmn.analysis.neurons" in GRAPH
    assert "mmn.analysis.attribution" in GRAPH["mmn.analysis.neurons"]
    assert "mmn.recipes.run" in GRAPH["mmn.recipes.analyze"]


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_imports_no_recipe(package):
    arrows = {module: sorted(name for name in names if name.startswith("mmn.recipes"))
              for module, names in GRAPH.items() if module.startswith(f"mmn.{package}")}
    assert {module: names for module, names in arrows.items() if names} == {}


def test_analysis_does_not_import_training_and_the_scorers_not_the_world():
    arrows = {module: sorted(names) for module, names in GRAPH.items() if module.startswith("mmn.analysis")}
    assert {m: [n for n in names if n.startswith("mmn.training")] for m, names in arrows.items()
            if any(n.startswith("mmn.training") for n in names)} == {}
    for scorer in ("mmn.analysis.clipscore", "mmn.analysis.bertscore"):
        assert not [name for name in GRAPH[scorer] if name.startswith("mmn.world")], scorer


@pytest.mark.parametrize("package", [p for p in LIBRARY if p != "world"])
def test_the_library_takes_no_config(package):
    # the world's builder reads a mapping (world.json's config), whichever kind it is handed
    users = [str(path.relative_to(ROOT)) for path in project_files(f"mmn/{package}")
             if re.search(r"\bomegaconf\b|\bDictConfig\b", path.read_text())]
    assert users == []


CODE = project_files("mmn", "experiments", "benchmarks") + sorted(ROOT.glob("*.py"))


def test_hooks_are_registered_by_the_hook_layer_only():
    modules = re.compile(r"register_(forward_hook|forward_pre_hook|full_backward_hook|full_backward_pre_hook)\(")
    assert [str(path.relative_to(ROOT)) for path in CODE if modules.search(path.read_text())] == ["mmn/models/lm.py"]
    # one gradient hook on a tensor: grad attribution's dy/dZ, read as the backward pass reaches Z;
    # it lives and dies with that pass's graph, so there is nothing to remove
    tensors = re.compile(r"\.register_hook\(")
    assert [str(path.relative_to(ROOT)) for path in CODE if tensors.search(path.read_text())] == [
        "mmn/analysis/attribution.py"]


def test_nothing_outside_the_models_reaches_into_the_hugging_face_model():
    pattern = re.compile(r"\blm\.model\b|\.language_model\b|base_model\(")
    users = [str(path.relative_to(ROOT)) for path in CODE
             if not path.is_relative_to(ROOT / "mmn" / "models") and pattern.search(path.read_text())]
    assert users == []
