"""The layering rule the package docstrings state, checked on the source (AST, every
import, top-level or inside a function): stage logic imports no kfp, boto3 or mlflow,
no plumbing that talks to S3/MLflow/Kubeflow and no other stage; plumbing imports no
kfp and nothing above it; nothing in ``components`` imports the pipeline layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ROOT / "components"
PKG = "llmpress.components"

STAGE_FORBIDDEN = ("kfp", "boto3", "botocore", "mlflow", f"{PKG}.kubeflow", f"{PKG}.artifacts", f"{PKG}.tracking", f"{PKG}.report")
PLUMBING_FORBIDDEN = ("kfp", f"{PKG}.kubeflow", f"{PKG}.stages")
PLUMBING = ("artifacts", "tracking", "report", "models", "data.py", "errors.py", "packaged.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(COMPONENTS).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PKG, *parts])


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """Every module an import statement in ``path`` names, resolved to absolute names."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(files: list[Path], forbidden: tuple[str, ...], extra=None) -> list[str]:
    bad = []
    for path in files:
        for line, name in imports(path):
            if any(under(name, f) for f in forbidden) or (extra and extra(path, name)):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def python_files(*parts: str) -> list[Path]:
    files: list[Path] = []
    for part in parts:
        target = COMPONENTS / part
        files += [target] if target.is_file() else sorted(target.rglob("*.py"))
    return files


def technique(path: Path) -> str:
    return path.relative_to(COMPONENTS / "stages").parts[0]


def test_every_technique_is_one_package_with_its_config_and_run_on_top():
    packages = sorted(p.parent.name for p in (COMPONENTS / "stages").glob("*/__init__.py"))
    assert packages == ["distill", "evaluate", "prune", "quantize"]
    loose = [p.name for p in (COMPONENTS / "stages").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], "stage modules belong inside their technique's package"
    for name in packages:
        top = ast.parse((COMPONENTS / "stages" / name / "__init__.py").read_text())
        defined = {n.name for n in top.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        assert "run" in defined and f"{name.capitalize()}Config" in defined, name


def test_stage_logic_imports_no_kfp_boto3_mlflow_nor_another_stage():
    files = python_files("stages")
    assert len(files) > 10

    def other_stage(path: Path, name: str) -> bool:
        if path.parent == COMPONENTS / "stages":
            return False
        return under(name, f"{PKG}.stages") and name.count(".") >= 3 and name.split(".")[3] != technique(path)

    assert violations(files, STAGE_FORBIDDEN, other_stage) == []


def test_plumbing_imports_no_kfp_and_nothing_above_it():
    files = python_files(*PLUMBING)
    assert len(files) > 8
    assert violations(files, PLUMBING_FORBIDDEN) == []


def test_components_never_import_the_pipeline_layer():
    def pipeline_layer(path: Path, name: str) -> bool:
        return under(name, "llmpress") and not under(name, PKG)

    assert violations(python_files("."), (), pipeline_layer) == []


@pytest.mark.parametrize(
    "source, forbidden, expected",
    [
        ("import kfp.dsl\n", STAGE_FORBIDDEN, ["kfp.dsl"]),
        ("def f():\n    from mlflow.tracking import MlflowClient\n", STAGE_FORBIDDEN, ["mlflow.tracking", "mlflow.tracking.MlflowClient"]),
        ("from llmpress.components import tracking\n", STAGE_FORBIDDEN, ["llmpress.components.tracking"]),
        ("from llmpress.components.models import io\n", STAGE_FORBIDDEN, []),
        ("from ..kubeflow import steps\n", PLUMBING_FORBIDDEN, ["llmpress.components.kubeflow", "llmpress.components.kubeflow.steps"]),
    ],
)
def test_the_checker_catches_what_it_must(source, forbidden, expected):
    # as if the source were a module of components/report/
    names = [name for _, name in imports(COMPONENTS / "report" / "probe.py", source) if any(under(name, f) for f in forbidden)]
    assert names == expected
