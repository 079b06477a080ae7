import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_import_layers_and_no_cycles():
    """The import-linter contracts of pyproject.toml: the layers from the CLI down to the typed
    config, and no cycle between the modules of a package."""
    lint_imports = Path(sys.executable).with_name("lint-imports")  # installed beside this Python by .[dev]
    result = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout
