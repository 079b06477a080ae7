"""Building the teacher/student pairs that have no hub copy, once and atomically.

    opdx prepare model=tiny                 # writes opdx/assets/tiny/{teacher,student}
    opdx prepare model=tiny_products        # opdx/assets/tiny_products/teacher: a second tiny teacher (products)
    opdx prepare model=tiny_hd32            # $OPDX_CACHE/tiny_hd32/...: the tiny student with 32-dim heads (vLLM)
    opdx prepare model=smollm2_135m         # writes $OPDX_CACHE/smollm2_135m/{teacher,student}
    opdx prepare model=qwen2p5_coder_1p5b_to_0p5b   # $OPDX_CACHE/qwen2p5_coder_1p5b_to_0p5b/...
    opdx prepare model=tiny out=DIR         # somewhere else

``PAIRS`` maps a ``conf/model`` name to its builder (one module each); a pair is built into the
directory its YAML names (the parent of its teacher) by ``opdx prepare`` or on first use
(``ensure_built``), and then loads like any hub model through ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from opdx.config import ModelConfig, load_option
from opdx.pairs import qwen2p5_coder, smollm2, tiny, tiny_hd32, tiny_products
from opdx.pairs.gguf import WeightFilesError

__all__ = ["BUILD_REPORT", "PAIRS", "WeightFilesError", "build", "build_dir", "ensure_built"]

# name -> builder(out_dir, seed) -> report, for the model configs whose weights are built here
PAIRS: dict[str, Callable[..., dict]] = {
    "tiny": tiny.build,
    "tiny_hd32": tiny_hd32.build,
    "tiny_products": tiny_products.build,
    "smollm2_135m": smollm2.build,
    "qwen2p5_coder_1p5b_to_0p5b": qwen2p5_coder.build,
}


def build_dir(name: str) -> Path:
    """Where ``conf/model/<name>.yaml`` expects a locally built pair: the parent of its teacher."""
    return Path(load_option("model", name)["teacher"]).parent


BUILD_REPORT = "prepare_report.json"  # written last: a directory without it is an unfinished build


def build(name: str, out_dir: Path, seed: int = 0, replace: bool = True) -> dict:
    """Build the pair ``name`` into ``out_dir`` atomically (a temporary sibling, then a rename),
    so a killed build or a second job never leaves half-written weights that later load.
    ``replace=False`` keeps a finished build another process made meanwhile."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        report = PAIRS[name](Path(tmp), seed=seed)
        (Path(tmp) / BUILD_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if not replace and (out_dir / BUILD_REPORT).exists():
            return report
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return report


def ensure_built(cfg: ModelConfig) -> None:
    """Build a locally built pair the first time its configured directory is used; any other
    teacher / student (a hub id, a local path) is left to ``from_pretrained``."""
    if cfg.name not in PAIRS:
        return
    out_dir = build_dir(cfg.name)
    if (Path(cfg.teacher), Path(cfg.student)) != (out_dir / "teacher", out_dir / "student"):
        return
    if not (out_dir / BUILD_REPORT).exists():
        print(f"model={cfg.name}: building {out_dir} once (opdx prepare model={cfg.name})")
        build(cfg.name, out_dir, replace=False)
