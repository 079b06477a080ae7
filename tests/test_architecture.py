import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from opdx.objective import ESTIMATORS
from opdx.tables import ESTIMATOR_PAIR


def test_import_contracts_hold():
    """The import-linter contracts of pyproject.toml: the layers from the CLI down to the typed
    config, no cycle between the modules of a package, no job importing a concrete backend, and
    the backends independent of each other."""
    lint_imports = Path(sys.executable).with_name("lint-imports")  # installed beside this Python by .[dev]
    result = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_light_commands_do_not_load_torch():
    """`opdx table` and `opdx plot` read JSON and pandas only: importing their modules through the
    CLI loads neither torch nor transformers."""
    code = "import sys, opdx.cli, opdx.tables; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_table_estimators_are_registry_names():
    assert set(ESTIMATOR_PAIR) <= set(ESTIMATORS)


def test_a_mixture_is_never_a_type_test_outside_its_module_and_the_routing():
    """Every benchmark has components (a plain one has one): no job branches on the Mixture type."""
    allowed = {Path("opdx/benchmarks/mixture.py"), Path("opdx/backends/routing.py")}
    offenders = []
    for path in sorted((REPO / "opdx").rglob("*.py")):
        if path.relative_to(REPO) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            is_check = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
            if is_check and "Mixture" in ast.unparse(node.args[1]):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
