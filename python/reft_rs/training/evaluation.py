"""Scoring a :class:`ReftModel` on a development or test set.

The metrics are those of :mod:`reft_rs.training.metrics`: ``loss`` (the model's own,
per label token for language modelling and per example for classification),
``accuracy`` (a classifier's), ``exact_match`` and ``contains`` (greedy
replies to each prompt against the reference response, as text), or any
callable ``metric(reft_model) -> float``.

Example::

    score = reft_rs.training.evaluation.evaluate(reft_model, dev, "exact_match", tokenizer=tokenizer)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .data import IGNORE_INDEX, ReftDataset, pad_features
from .metrics import Metric, greater_is_better, reply_matches

__all__ = ["evaluate", "example_scores", "generate_replies"]


def evaluate(
    reft_model: Any,
    dataset: ReftDataset,
    metric: Metric = "loss",
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    max_new_tokens: int | None = None,
) -> float:
    """The score of ``reft_model`` on ``dataset`` (dropout off, no gradients).

    Args:
        reft_model: A :class:`reft_rs.ReftModel`.
        dataset: A :class:`reft_rs.ReftDataset` made like the training set.
        metric: A name of :data:`reft_rs.training.metrics.METRICS` or a callable of the model.
        tokenizer: Needed by ``exact_match`` and ``contains`` (to read the
            replies as text) and for its pad token.
        batch_size: Examples per forward pass or generation batch.
        pad_token_id: By default the tokenizer's pad token, else 0.
        max_new_tokens: Generation length; by default each batch's longest
            reference response plus one token.

    Raises:
        ConfigError: An unknown metric, or one that does not fit the data
            (``accuracy`` without class labels, ``exact_match`` without
            responses or a tokenizer).
    """
    if callable(metric):
        return float(metric(reft_model))
    greater_is_better(metric)
    if len(dataset) == 0:
        raise ConfigError("the evaluation set is empty")
    if pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        pad_token_id = int(pad) if pad is not None else 0
    was_training = reft_model.training
    reft_model.eval()
    try:
        with torch.no_grad():
            if metric == "loss":
                return _loss(reft_model, dataset, batch_size, pad_token_id)
            if metric == "accuracy":
                return _accuracy(reft_model, dataset, batch_size, pad_token_id)
            return _generation_score(
                reft_model, dataset, metric, tokenizer, batch_size, pad_token_id, max_new_tokens
            )
    finally:
        reft_model.train(was_training)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss(reft_model: Any, dataset: ReftDataset, batch_size: int, pad_token_id: int) -> float:
    total, count = 0.0, 0
    for batch in dataset.batches(batch_size, pad_token_id):
        labels = batch["labels"]
        if dataset.encoder_decoder:
            # an encoder-decoder's decoder predicts each label where it stands
            weight = int((labels != IGNORE_INDEX).sum())
        elif dataset.token_labels:
            # the model's loss is the mean over the shifted label tokens
            weight = int((labels[:, 1:] != IGNORE_INDEX).sum())
        else:
            weight = int(labels.shape[0])
        if weight == 0:
            continue
        loss = reft_model(**_to(batch, reft_model.device)).loss
        total += float(loss) * weight
        count += weight
    if count == 0:
        raise ConfigError("the evaluation set has no labelled tokens to compute a loss on")
    return total / count


def _accuracy(reft_model: Any, dataset: ReftDataset, batch_size: int, pad_token_id: int) -> float:
    return float(_correct(reft_model, dataset, batch_size, pad_token_id).mean())


def _correct(reft_model: Any, dataset: ReftDataset, batch_size: int, pad_token_id: int) -> np.ndarray:
    if dataset.token_labels or dataset.labels is None:
        raise ConfigError("accuracy scores a classifier's labels; for replies use exact_match or contains")
    hits = []
    for batch in dataset.batches(batch_size, pad_token_id):
        labels = batch.pop("labels")
        logits = reft_model(**_to(batch, reft_model.device)).logits
        hits.append((logits.argmax(-1).cpu() == labels).numpy())
    return np.concatenate(hits).astype(np.float64)


def example_scores(
    reft_model: Any,
    dataset: ReftDataset,
    metric: str,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    max_new_tokens: int | None = None,
) -> np.ndarray:
    """Each example's score, in dataset order (for bootstrap intervals):
    1 or 0 for ``accuracy``, ``exact_match`` and ``contains``; for ``loss``
    the example's mean loss over its label tokens (cross-entropy, also for a
    single-label classifier)."""
    greater_is_better(metric)
    if pad_token_id is None:
        pad = getattr(tokenizer, "pad_token_id", None)
        pad_token_id = int(pad) if pad is not None else 0
    was_training = reft_model.training
    reft_model.eval()
    try:
        with torch.no_grad():
            if metric == "accuracy":
                return _correct(reft_model, dataset, batch_size, pad_token_id)
            if metric == "loss":
                return _example_losses(reft_model, dataset, batch_size, pad_token_id)
            if not dataset.token_labels or tokenizer is None:
                raise ConfigError(f"{metric} needs responses and a tokenizer")
            replies = generate_replies(
                reft_model, dataset, tokenizer, batch_size, pad_token_id, max_new_tokens
            )
            expected = [
                tokenizer.decode(_response_ids(dataset, i), skip_special_tokens=True)
                for i in range(len(dataset))
            ]
            return np.array([float(reply_matches(metric, r, e)) for r, e in zip(replies, expected)])
    finally:
        reft_model.train(was_training)


def _example_losses(reft_model: Any, dataset: ReftDataset, batch_size: int, pad_token_id: int) -> np.ndarray:
    losses = []
    for batch in dataset.batches(batch_size, pad_token_id):
        labels = batch.pop("labels")
        logits = reft_model(**_to(batch, reft_model.device)).logits.float().cpu()
        if dataset.token_labels:
            # A decoder-only model predicts token t+1 at t; an encoder-decoder's
            # decoder predicts label t at t.
            shifted, targets = (
                (logits, labels) if dataset.encoder_decoder else (logits[:, :-1], labels[:, 1:])
            )
            keep = targets != IGNORE_INDEX
            each = torch.nn.functional.cross_entropy(
                shifted.reshape(-1, shifted.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none"
            ).view_as(targets)
            losses.append(((each * keep).sum(1) / keep.sum(1).clamp(min=1)).numpy())
        else:
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy())
    return np.concatenate(losses).astype(np.float64)


def _generation_score(
    reft_model: Any,
    dataset: ReftDataset,
    metric: str,
    tokenizer: Any,
    batch_size: int,
    pad_token_id: int,
    max_new_tokens: int | None,
) -> float:
    if not dataset.token_labels:
        raise ConfigError(f"{metric} compares generated replies with responses; this set has class labels")
    if tokenizer is None:
        raise ConfigError(f"{metric} reads the replies as text: pass tokenizer=")
    replies = generate_replies(reft_model, dataset, tokenizer, batch_size, pad_token_id, max_new_tokens)
    hits = 0
    for index, reply in enumerate(replies):
        expected = tokenizer.decode(_response_ids(dataset, index), skip_special_tokens=True)
        hits += reply_matches(metric, reply, expected)
    return hits / len(dataset)


def _response_ids(dataset: ReftDataset, index: int) -> np.ndarray:
    start, end = dataset.offsets[index], dataset.offsets[index + 1]
    return dataset.tokens[start + dataset.prompt_lengths[index] : end]


def generate_replies(
    reft_model: Any,
    dataset: ReftDataset,
    tokenizer: Any,
    batch_size: int = 8,
    pad_token_id: int = 0,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Greedy replies to each example's prompt, as text (left-padded
    batches; an encoder-decoder's prompts are its encoder's input, padded on
    the right, and its replies everything its decoder writes)."""
    replies: list[str] = []
    device = reft_model.device
    seq2seq = dataset.encoder_decoder
    for first in range(0, len(dataset), batch_size):
        indices = range(first, min(first + batch_size, len(dataset)))
        prompts = [
            dataset.tokens[dataset.offsets[i] : dataset.offsets[i] + dataset.prompt_lengths[i]].astype(
                np.int64
            )
            for i in indices
        ]
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("an example has an empty prompt; nothing to generate from")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            start = 0 if seq2seq else width - len(prompt)
            ids[row, start : start + len(prompt)] = torch.from_numpy(prompt)
            mask[row, start : start + len(prompt)] = 1
        limit = max_new_tokens or 1 + max(len(_response_ids(dataset, i)) for i in indices)
        # A vision-language model's image features, laid out for the batch.
        features = pad_features(
            [dataset.prompt_features(i) for i in indices],
            np.array([len(p) for p in prompts]),
            width,
            not seq2seq,
        )
        out = reft_model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=limit,
            do_sample=False,
            pad_token_id=pad_token_id,
            **{key: torch.from_numpy(value).to(device) for key, value in features.items()},
        )
        first = 0 if seq2seq else width  # a decoder's output holds no prompt
        replies.extend(tokenizer.decode(row[first:], skip_special_tokens=True) for row in out.cpu())
    return replies
