"""A user's script that knows nothing of gpufleet (tests run it as a command job).

``MODE=count`` counts to ``STEPS`` (``SLOW`` seconds a step), appending each start to
``starts`` in the output directory and writing ``done`` at the end; ``MODE=oom`` prints what
PyTorch prints when CUDA runs out of memory and exits 1.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

out = Path(os.environ["GPUFLEET_OUTPUT_DIR"])
if os.environ.get("MODE") == "oom":
    print("Traceback (most recent call last):", file=sys.stderr)
    print(
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
        "total capacity of 15.77 GiB of which 1.02 GiB is free.",
        file=sys.stderr,
    )
    sys.exit(1)
with (out / "starts").open("a") as starts:
    starts.write(f"{os.getpid()} resume_from={os.environ['GPUFLEET_RESUME_FROM']!r}\n")
for step in range(int(os.environ.get("STEPS", "5"))):
    print(f"step {step}", flush=True)
    time.sleep(float(os.environ.get("SLOW", "0")))
(out / "done").write_text("ok")
