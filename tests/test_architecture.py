"""The engine is our own implementation: import-linter enforces that it never imports diffusers' transformer
models or pipelines (nor the harness or the reference), and the contract is shown able to fail."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(cwd, env_path=None):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    if env_path:
        env["PYTHONPATH"] = str(env_path)
    return subprocess.run(LINT + ["--no-cache"], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_import_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_contract_catches_a_pipeline_import(tmp_path):
    """Plant the forbidden import in a copy of the engine: the same contract must break."""
    for pkg in ("engine", "harness", "reference"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "engine" / "cheat.py").write_text("from diffusers.pipelines.flux import FluxPipeline\n")
    result = _lint(tmp_path, env_path=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "engine.cheat -> diffusers.pipelines" in result.stdout
