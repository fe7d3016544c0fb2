"""``reft-rs inspect``: a checkpoint's interventions, sizes and base model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import (
    UsageError,
    add_command,
    device_for,
    load_torch_model,
    model_path,
    read_checkpoint,
    require_torch,
)

EXAMPLES = """examples:
  reft-rs inspect reft-quickstart/checkpoint
  reft-rs inspect runs/style --json
  reft-rs inspect runs/style --subspace --data dev.jsonl --plot overlap.png
  reft-rs inspect runs/style --subspace --compare runs/other-seed

--subspace loads the base model and shows, per intervention, the tokens each
row of R (or W2) and of W promotes and suppresses through the model's
unembedding (final norm applied), and with --data the mean edit size
|Phi(h) - h| and the share of h in the subspace over that dataset;
principal angles between the interventions (and with --compare, those of
another checkpoint); --plot draws their overlap as a heatmap."""


def register(commands: Any) -> None:
    inspect = add_command(
        commands, "inspect", "show a checkpoint's interventions, sizes and base model", EXAMPLES
    )
    inspect.add_argument("checkpoint")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument(
        "--subspace", action="store_true", help="look inside the learned subspaces (needs torch)"
    )
    inspect.add_argument("--model", help="the base model (default: the checkpoint's)")
    inspect.add_argument("--data", help="records to measure the edits over (--subspace)")
    inspect.add_argument(
        "--max-examples", type=int, default=256, help="examples of --data used (default 256)"
    )
    inspect.add_argument("--compare", help="another checkpoint: principal angles between the two")
    inspect.add_argument("--top-k", type=int, default=8, help="tokens per row (default 8)")
    inspect.add_argument("--plot", help="write the overlap heatmap to this PNG file")
    inspect.set_defaults(run=run)


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def run(args: argparse.Namespace) -> int:
    if args.subspace:
        return _subspace(args)
    for flag in ("model", "data", "compare", "plot"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} goes with --subspace")
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
    depth = f"{base['num_hidden_layers']} layers"
    if base.get("num_decoder_layers") is not None:
        depth = f"encoder-decoder, {base['num_hidden_layers']} encoder + {base['num_decoder_layers']} decoder layers"
    if base.get("num_vision_layers") is not None:
        depth += f" + a {base['num_vision_layers']}-layer vision encoder"
    print(
        f"base model: {base.get('name_or_path') or '?'} ({base.get('model_type') or '?'}, hidden size "
        f"{base['hidden_size']}, {depth})"
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
                # An encoder-decoder's stack as the component's prefix.
                ".".join(part for part in (entry.get("tower"), entry["component"]) if part),
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


def _subspace(args: argparse.Namespace) -> int:
    require_torch()
    from ..experiments import subspace
    from ..model.reft_model import ReftModel

    config, _ = read_checkpoint(args.checkpoint)
    labels = (config.get("metadata") or {}).get("labels")
    model, tokenizer = load_torch_model(
        model_path(args.model, args.checkpoint), device_for("cpu"), False, labels
    )
    reft_model = ReftModel.from_pretrained(model, args.checkpoint)
    report: dict[str, Any] = {"checkpoint": args.checkpoint}
    try:
        report["logit_lens"] = subspace.logit_lens(reft_model, tokenizer, top_k=args.top_k)
    except Exception as error:  # a model without an output embedding (a classifier)
        report["logit_lens"] = []
        report["logit_lens_skipped"] = str(error)
    if args.data:
        report["edits"] = subspace.edit_statistics(reft_model, _batches(args, reft_model, tokenizer, config))
    named = [(i.config.name, subspace.basis(i)) for i in reft_model.interventions]
    if args.compare:
        other = ReftModel.from_pretrained(reft_model.remove_hooks(), args.compare)
        named += [(f"{args.compare}:{i.config.name}", subspace.basis(i)) for i in other.interventions]
        other.remove_hooks()
    names, matrix = subspace.overlap_matrix(named)
    bases = dict(named)
    report["principal_angles"] = [
        {"a": a, "b": b, "degrees": subspace.principal_angles(bases[a], bases[b]).round(2).tolist()}
        for index, a in enumerate(names)
        for b in names[index + 1 :]
        if bases[a].shape[-1] == bases[b].shape[-1]
    ]
    report["overlap"] = {"names": names, "matrix": matrix.round(4).tolist()}
    if args.plot:
        subspace.heatmap(names, matrix, args.plot, title=f"subspace overlap: {Path(args.checkpoint).name}")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_subspace(report)
    if args.plot:
        print(f"wrote the overlap heatmap to {args.plot}")
    return 0


def _batches(args: argparse.Namespace, reft_model: Any, tokenizer: Any, config: dict[str, Any]) -> Any:
    from ..experiments.sweep import Task
    from ..io.records import read_records

    records = []
    for record in read_records(args.data):
        records.append(record)
        if len(records) >= args.max_examples:
            break
    labels = (config.get("metadata") or {}).get("labels")
    task = Task(train=records, dev=records, labels=labels)
    if labels is not None:
        records = [r for r in records if str(r.get("label")) in labels]
    dataset = task.dataset(tokenizer, records, reft_model.reft_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return list(dataset.batches(8, pad))


def _print_subspace(report: dict[str, Any]) -> None:
    edits = {e["name"]: e for e in report.get("edits", [])}
    for entry in report["logit_lens"]:
        print(f"{entry['name']} ({entry['type']})")
        stats = edits.get(entry["name"])
        if stats and stats["states"]:
            share = (
                ""
                if stats["subspace_share"] is None
                else f", {stats['subspace_share']:.1%} of |h|^2 in the subspace"
            )
            print(f"  over {stats['states']} edited states: mean |Phi(h) - h| {stats['mean_edit_norm']:.3f} "
                  f"(mean |h| {stats['mean_state_norm']:.3f}){share}")  # fmt: skip
        for label in ("basis", "source"):
            for row, tokens in enumerate(entry.get(label, [])):
                name = "R/W2" if label == "basis" else "W"
                promotes = " ".join(repr(t) for t in tokens["promotes"])
                suppresses = " ".join(repr(t) for t in tokens["suppresses"])
                print(
                    f"  {name} row {row}: promotes {promotes}\n  {' ' * len(name)}        suppresses {suppresses}"
                )
    if report.get("logit_lens_skipped"):
        print(f"(no logit lens: {report['logit_lens_skipped']})")
    if report["principal_angles"]:
        print("principal angles (degrees):")
        for pair in report["principal_angles"]:
            print(f"  {pair['a']} vs {pair['b']}: {', '.join(f'{d:.1f}' for d in pair['degrees'])}")
