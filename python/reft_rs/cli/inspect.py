"""``reft-rs inspect``: a checkpoint's interventions, sizes and base model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import add_command, read_checkpoint

EXAMPLES = """examples:
  reft-rs inspect reft-quickstart/checkpoint
  reft-rs inspect runs/style --json"""


def register(commands: Any) -> None:
    inspect = add_command(
        commands, "inspect", "show a checkpoint's interventions, sizes and base model", EXAMPLES
    )
    inspect.add_argument("checkpoint")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=run)


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def run(args: argparse.Namespace) -> int:
    import numpy as np

    folder = Path(args.checkpoint)
    config, tensors = read_checkpoint(args.checkpoint)
    counts: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    for key, dtype, shape in tensors:
        owner = key.partition(".")[0]
        counts[owner] = counts.get(owner, 0) + int(np.prod(shape))
        dtypes[owner] = dtype
    extra = set(config.get("extra_tensors") or [])
    trainable = sum(
        int(np.prod(shape)) for key, _, shape in tensors if key not in extra or key.startswith("head.")
    )
    files = {p.name: _size(p) for p in sorted(folder.iterdir()) if p.is_file()}
    if args.json:
        print(json.dumps({"config": config, "parameters": counts, "files": files}, indent=2))
        return 0
    base = config["base_model"]
    print(
        f"checkpoint {folder} (format {config.get('format_version')}, reft_rs {config.get('library_version')})"
    )
    print(
        f"base model: {base.get('name_or_path') or '?'} ({base.get('model_type') or '?'}, hidden size "
        f"{base['hidden_size']}, {base['num_hidden_layers']} layers)"
    )
    print(f"{len(config['interventions'])} interventions, {trainable:,} trained parameters")
    rows = [("name", "type", "layer", "component", "positions", "rank", "parameters")]
    for entry in config["interventions"]:
        rank = entry.get("low_rank_dimension")
        positions = (entry.get("positions") or "all") + (" shared" if entry.get("share_weights") else "")
        if not entry.get("include_last", True):
            positions += " (last token excluded)"
        rows.append(
            (
                entry["name"],
                entry["type"],
                str(entry["layer"]),
                entry["component"],
                positions,
                "-" if rank is None else str(rank),
                f"{counts.get(entry['name'], 0):,} {dtypes.get(entry['name'], '?')}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    metadata = {k: v for k, v in (config.get("metadata") or {}).items() if k != "trainable_head"}
    if metadata:
        print(f"metadata: {json.dumps(metadata)}")
    print("files: " + ", ".join(f"{name} ({size})" for name, size in files.items()))
    return 0
