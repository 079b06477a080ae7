import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_three_kills_resume_to_the_uninterrupted_run():
    """scripts/kill_resume.py --kills 3: killed during a checkpoint write, during an eval and at a
    random moment, each run resumes to the uninterrupted run's metrics and weights exactly."""
    result = subprocess.run(
        [sys.executable, "scripts/kill_resume.py", "--kills", "3"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3/3 identical" in result.stdout
    assert "while writing .step_" in result.stdout and "into eval" in result.stdout
