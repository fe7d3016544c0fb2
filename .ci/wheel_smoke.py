"""The torch-free surface of an installed wheel, run in a virtual environment
that has the wheel and nothing else (CI's release-artifact step).

    python .ci/wheel_smoke.py TINY_MODEL_FOLDER
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import reft_rs

model = Path(sys.argv[1])
assert "site-packages" in reft_rs.__file__, f"reft_rs comes from {reft_rs.__file__}, not the wheel"

# Positions: pyreft's rule (first min(n//2, p), last min(n//2, s)), by hand.
lengths = [10, 4, 1]
located = reft_rs.positions.locate(lengths, "f3+l3")
for row, n in enumerate(lengths):
    first, last = min(n // 2, 3), min(n // 2, 3)
    want_first = list(range(first)) + [-1] * (3 - first)
    want_last = list(range(n - last, n)) + [-1] * (3 - last)
    assert located[0][row].tolist() == want_first and located[1][row].tolist() == want_last, (row, located)

# A checkpoint saved and loaded bit for bit.
config = {
    "base_model": {"name_or_path": "m", "model_type": "llama", "hidden_size": 3, "num_hidden_layers": 1},
    "interventions": [{"name": "s", "type": "steer", "layer": 0, "component": "block_output", "positions": "all"}],
}
vector = np.array([0.5, -1.25, 3.0], np.float32)
with tempfile.TemporaryDirectory() as folder:
    reft_rs.io.checkpoint.save(folder, config, {"s.vector": vector})
    assert np.array_equal(reft_rs.io.checkpoint.load(folder)[1]["s.vector"], vector)

# The engine on a tiny model: greedy decoding is deterministic and batch-free.
engine = reft_rs.Engine(model, threads=1)
alone = engine.generate_ids([[1, 2, 3]], 5, ignore_eos=True)[0]
together = engine.generate_ids([[1, 2, 3], [4, 5]], 5, ignore_eos=True)[0]
assert len(alone) == 5 and alone == together, (alone, together)
print("engine kernels:", reft_rs.engine.kernel_isa())

# The command: serve's help, and quickstart's install hint without torch.
command = str(Path(sys.executable).parent / "reft-rs")
help_text = subprocess.run([command, "serve", "--help"], capture_output=True, text=True, timeout=60)
assert help_text.returncode == 0 and "--model" in help_text.stdout, help_text
refused = subprocess.run([command, "quickstart"], capture_output=True, text=True, timeout=60)
assert refused.returncode != 0 and "pip install" in refused.stderr, refused
assert "torch" not in sys.modules
print("the wheel's torch-free surface works")
