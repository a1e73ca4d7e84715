"""What importing the engine's family registry costs. Every process that names a family imports it: the sweep, the
gate, each rank of a parallel cell. Families defer their text encoders and VAE (diffusers and transformers, ~6 s
of imports on a 2-core CPU) to the pipeline's load, so a registry import pays for none of them, and a FLUX.1
sweep never imports Qwen2.5-VL's or Wan's model code."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFERRED = ("diffusers", "transformers")


def test_the_family_registry_imports_no_component_library():
    code = ("import sys, engine.families, engine.runner; "
            f"print(sorted(m for m in {DEFERRED!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"imported at registry import: {out.stdout.strip()}"
