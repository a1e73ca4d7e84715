"""The engine is our own implementation: import-linter enforces that it never imports diffusers' transformer
models or pipelines (nor the harness or the reference), and that the harness reaches the engine only through
engine/api.py; each contract is shown able to fail. Generic code names no model family (checked below)."""
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
    assert "3 kept, 0 broken" in result.stdout


def _copy_tree(tmp_path):
    for pkg in ("engine", "harness", "reference"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")


def test_contract_catches_a_pipeline_import(tmp_path):
    """Plant the forbidden import in a copy of the engine: the same contract must break."""
    _copy_tree(tmp_path)
    (tmp_path / "engine" / "cheat.py").write_text("from diffusers.pipelines.flux import FluxPipeline\n")
    result = _lint(tmp_path, env_path=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "engine.cheat -> diffusers.pipelines" in result.stdout


def test_contract_catches_the_harness_reaching_past_engine_api(tmp_path):
    """Plant an import of an engine internal in a copy of the harness: the one-door contract must break (and only
    it), while the harness's imports of engine.api stay allowed."""
    _copy_tree(tmp_path)
    (tmp_path / "harness" / "cheat.py").write_text("from engine.api import RunConfig\n"
                                                   "from engine.quant.api import QuantSpec\n")
    result = _lint(tmp_path, env_path=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "harness.cheat -> engine.quant.api" in result.stdout and "2 kept, 1 broken" in result.stdout


# --- generic code names no model family ---------------------------------------------------------------------------
import io  # noqa: E402
import re  # noqa: E402
import tokenize  # noqa: E402

PACKAGES = ("engine", "harness", "reference")
# A family's own files, by family name (see STYLE.md): everything else is generic.
OWN_FILES = ("engine/models/{}.py", "engine/pipelines/{}.py", "reference/{}.py", "harness/zoo/{}.py",
             "harness/selftest/{}.py")
# The registries may name a family, but only on an import or a `"name": module.ENTRY,` line.
REGISTRIES = ("engine/families.py", "reference/registry.py", "harness/zoo/__init__.py", "harness/selftest/__init__.py")
REGISTRY_LINE = re.compile(r'^\s*(from [\w.]+ import [\w, ]+|import [\w.]+'
                           r'|("[\w-]+": [\w.]+,\s*)+|\w+(: [\w\[\], .]+)? = \{("[\w-]+": [\w.]+,? ?)+\})\s*$')


def registered_families() -> set[str]:
    from engine.families import FAMILIES as ENGINE
    from harness.zoo import FAMILIES as ZOO
    from reference.registry import REFERENCES

    return set(ENGINE) | set(REFERENCES) | set(ZOO)


def family_terms(families) -> set[str]:
    """What naming a family looks like: its registry key in any spelling, and its stem ('flux1' -> 'flux',
    'qwen-image' -> 'qwen'), which also catches its classes (FluxPipeline, Flux1Transformer) and helpers."""
    terms = set()
    for name in families:
        key = name.lower()
        terms |= {key, key.replace("-", "_"), key.replace("-", ""), re.split(r"[-_\d]", key)[0]}
    return {t for t in terms if len(t) >= 3}


def own_file(rel: str, families) -> bool:
    return any(rel == pattern.format(f.replace("-", "_")) for f in families for pattern in OWN_FILES)


def family_mentions(root: Path, families) -> list[str]:
    """'path:line: token' for every identifier or string (docstrings included; comments are not code) in a generic
    module that names a registered family."""
    terms = family_terms(families)
    hits = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if own_file(rel, families):
                continue
            source = path.read_text()
            lines = source.splitlines()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type not in (tokenize.NAME, tokenize.STRING):
                    continue
                if not any(t in tok.string.lower() for t in terms):
                    continue
                line = lines[tok.start[0] - 1]
                if rel in REGISTRIES and REGISTRY_LINE.match(line):
                    continue
                hits.append(f"{rel}:{tok.start[0]}: {tok.string[:60]}")
    return hits


def test_generic_code_names_no_family():
    families = registered_families()
    assert "flux1" in families  # the check below is only as good as the registries it reads
    hits = family_mentions(REPO, families)
    assert not hits, "generic modules name a model family (move it into the family's files or a registry line):\n" \
        + "\n".join(hits)


def test_family_check_catches_a_planted_mention(tmp_path):
    """Plant a family branch in a copy of a generic module (and one in a registry, off its registry lines): the
    same check must report both, and nothing else."""
    families = registered_families()
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    runner = tmp_path / "engine" / "runner.py"
    runner.write_text(runner.read_text() + '\n\ndef steps_for(cfg):\n    return 28 if cfg.family == "flux1" else 50\n')
    registry = tmp_path / "engine" / "families.py"
    registry.write_text(registry.read_text() + "\nDEFAULT = FAMILIES['flux1']\n")
    hits = family_mentions(tmp_path, families)
    assert len(hits) == 2 and hits[0].startswith("engine/families.py:") and hits[1].startswith("engine/runner.py:"), hits
    assert not family_mentions(REPO, families)
