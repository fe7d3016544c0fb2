"""Training data: tokenized prompt/response pairs with their intervention locations.

:func:`make_dataset` tokenizes a whole dataset in batch calls (through the
tokenizer's chat template when it has one), masks the prompt in the labels,
and chooses the intervention positions of every example with one call into
Rust. :class:`ReftDataCollator` pads a batch (left or right), moves the
locations with the padding, and returns tensors ready for
``ReftModel(**batch)`` or the ``transformers`` Trainer.

Example::

    dataset = make_dataset(tokenizer, prompts, responses, config=reft_config)
    collator = ReftDataCollator(tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collator)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import ReftConfig
from .errors import ConfigError
from .positions import locate

__all__ = ["IGNORE_INDEX", "ReftDataCollator", "ReftDataset", "make_dataset", "tokenize_pairs"]

IGNORE_INDEX = -100


class ReftDataset(torch.utils.data.Dataset):
    """Tokenized examples, their labels and their locations.

    Attributes:
        input_ids: Token ids of each example (prompt, then response).
        labels: Token labels (-100 on the prompt) for language modelling, or
            one label per example for classification, or ``None``.
        prompt_lengths: Prompt tokens per example.
        locations: ``(groups, examples, positions)`` from
            :func:`reft_rs.positions.locate`, or ``None`` when no intervention
            reads locations. Examples take views of it, never copies.
    """

    def __init__(
        self,
        input_ids: Sequence[Sequence[int]],
        labels: Sequence[Any] | None,
        prompt_lengths: np.ndarray,
        locations: np.ndarray | None,
    ) -> None:
        self.input_ids = [np.asarray(ids, dtype=np.int64) for ids in input_ids]
        self.labels = labels
        self.prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
        self.locations = locations

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"input_ids": self.input_ids[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        if self.locations is not None:
            item["locations"] = self.locations[:, index]
        return item


def _chat_texts(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str] | None, system: str | None):
    """Prompt texts ending in the assistant turn's header, and the response
    texts that complete them (with the template's end-of-turn marker)."""
    prefix = [{"role": "system", "content": system}] if system else []
    prompt_texts, response_texts = [], []
    for index, prompt in enumerate(prompts):
        messages = [*prefix, {"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_texts.append(prompt_text)
        if responses is not None:
            full = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": responses[index]}], tokenize=False
            )
            if full.startswith(prompt_text):
                response_texts.append(full[len(prompt_text) :])
            else:
                response_texts.append(responses[index] + (tokenizer.eos_token or ""))
    return prompt_texts, response_texts


def tokenize_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    *,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of ``prompt + response`` per example, and the prompt lengths.

    Prompt and response are tokenized separately and joined, so the prompt's
    tokens are exactly those a generation from the prompt would see.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompts: The prompts.
        responses: The responses, or ``None`` (the prompt is everything).
        chat_template: Wrap prompts (and responses) in the tokenizer's chat
            template; by default when the tokenizer has one.
        system_prompt: A system message for the chat template.
        max_length: Cut sequences to this many tokens (the response first).
    """
    use_template = (
        chat_template if chat_template is not None else bool(getattr(tokenizer, "chat_template", None))
    )
    if use_template:
        prompt_texts, response_texts = _chat_texts(tokenizer, prompts, responses, system_prompt)
        prompt_ids = tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
    else:
        prompt_texts = list(prompts)
        response_texts = None if responses is None else [r + (tokenizer.eos_token or "") for r in responses]
        prompt_ids = tokenizer(prompt_texts, add_special_tokens=True)["input_ids"]
    if responses is None:
        sequences = [list(ids) for ids in prompt_ids]
    else:
        response_ids = tokenizer(list(response_texts), add_special_tokens=False)["input_ids"]
        sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    prompt_lengths = np.fromiter((len(p) for p in prompt_ids), dtype=np.int64, count=len(prompt_ids))
    if max_length is not None:
        sequences = [s[:max_length] for s in sequences]
        prompt_lengths = np.minimum(prompt_lengths, max_length)
    return sequences, prompt_lengths


def make_dataset(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    *,
    labels: Sequence[Any] | None = None,
    config: ReftConfig | None = None,
    positions: str | None = None,
    share_weights: bool = False,
    include_last: bool = True,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> ReftDataset:
    """Builds a :class:`ReftDataset` for language modelling or classification.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompts: The prompts (or, for classification, the texts).
        responses: The responses to learn; the loss covers them only.
        labels: For classification: one label per text (no ``responses``).
        config: The :class:`ReftConfig` to train; its interventions' position
            spec and ``share_weights`` are used. Or give ``positions``.
        positions, share_weights: The position spec when there is no config.
        include_last: Whether the last prompt token may be chosen (pyreft's
            library leaves it out: ``False``).
        chat_template, system_prompt, max_length: See :func:`tokenize_pairs`.
    """
    if responses is not None and labels is not None:
        raise ConfigError("give responses (language modelling) or labels (classification), not both")
    if responses is not None and len(responses) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses")
    if labels is not None and len(labels) != len(prompts):
        raise ConfigError(f"{len(prompts)} texts but {len(labels)} labels")
    if config is not None:
        shared = config.shared_positions()
        spec = None if shared is None else shared[0]
        share_weights = False if shared is None else shared[1]
    else:
        spec = positions
    sequences, prompt_lengths = tokenize_pairs(
        tokenizer,
        prompts,
        responses,
        chat_template=chat_template if responses is not None or chat_template else False,
        system_prompt=system_prompt,
        max_length=max_length,
    )
    if responses is not None:
        token_labels = []
        for sequence, prompt_length in zip(sequences, prompt_lengths):
            label = np.asarray(sequence, dtype=np.int64)
            label[:prompt_length] = IGNORE_INDEX
            token_labels.append(label)
        example_labels: Sequence[Any] | None = token_labels
    else:
        example_labels = labels
    locations = None
    if spec is not None:
        locations = locate(prompt_lengths, spec, share_weights=share_weights, include_last=include_last)
    return ReftDataset(sequences, example_labels, prompt_lengths, locations)


def _per_token(example: dict[str, Any]) -> bool:
    labels = np.asarray(example["labels"])
    return (
        labels.ndim == 1
        and labels.dtype.kind in "iu"
        and len(labels) == len(example["input_ids"])
        and bool((labels == IGNORE_INDEX).any())
    )


@dataclass
class ReftDataCollator:
    """Pads examples of a :class:`ReftDataset` into a batch.

    Args:
        pad_token_id: The token padding fills with.
        padding_side: ``"right"`` (training default) or ``"left"``.
        pad_to_multiple_of: Round the batch length up to a multiple of this.
        token_labels: Whether ``labels`` are per token (language modelling,
            padded with -100) or per example (classification, stacked). By
            default per token when each example's labels are as long as its
            input and mask the prompt with -100.

    Returns (when called): ``input_ids``, ``attention_mask``, ``labels`` (if
    the examples have them) and ``locations`` ``(groups, batch, positions)``,
    moved right by each example's padding when padding is on the left.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    token_labels: bool | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', found {self.padding_side!r}")
        if self.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; pass pad_token_id (e.g. the eos token id)")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
        width = int(lengths.max()) if len(lengths) else 0
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(examples)
        ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        left = self.padding_side == "left"
        offsets = width - lengths if left else np.zeros(batch, dtype=np.int64)
        token_labels = "labels" in examples[0] and (
            self.token_labels if self.token_labels is not None else _per_token(examples[0])
        )
        labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64) if token_labels else None
        for row, example in enumerate(examples):
            where = slice(offsets[row], offsets[row] + lengths[row])
            ids[row, where] = example["input_ids"]
            mask[row, where] = 1
            if labels is not None:
                labels[row, where] = example["labels"]
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if labels is not None:
            out["labels"] = torch.from_numpy(labels)
        elif "labels" in examples[0]:
            out["labels"] = torch.as_tensor(np.asarray([e["labels"] for e in examples]))
        if "locations" in examples[0]:
            locations = np.stack([e["locations"] for e in examples], axis=1)
            if left:
                shift = offsets[None, :, None]
                locations = np.where(locations >= 0, locations + shift, locations)
            out["locations"] = torch.from_numpy(np.ascontiguousarray(locations))
        return out
