"""Training data: tokenized prompt/response pairs with their intervention locations.

:func:`make_dataset` tokenizes a whole dataset in one call into Rust (the
tokenizer's own ids, through its chat template when it has one), masks the
prompt in the labels, and chooses the intervention positions of every
example with one more. The examples live in one flat token array.
:class:`ReftDataCollator` pads a batch (left or right), moves the locations
with the padding, and returns tensors ready for ``ReftModel(**batch)`` or the
``transformers`` Trainer; :meth:`ReftDataset.batches` does the same for
whole index batches at once, in length-grouped order if asked, and
:func:`stream_batches` does it chunk by chunk for datasets larger than memory.

Example::

    dataset = make_dataset(tokenizer, prompts, responses, config=reft_config)
    collator = ReftDataCollator(tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collator)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import _core
from ..config import ReftConfig
from ..errors import ConfigError, ReftError
from ..positions import IGNORE_INDEX, locate, locate_in_tokens

__all__ = [
    "IGNORE_INDEX",
    "Batches",
    "LengthGroupedSampler",
    "ReftDataCollator",
    "ReftDataset",
    "batch_tokenizer",
    "chat_affixes",
    "encode_pairs",
    "length_grouped_batches",
    "make_dataset",
    "pad_features",
    "StreamedEpochs",
    "stream_batches",
    "tokenize_pairs",
]


# Sentinels for finding where a chat template puts the message contents.
_PROMPT_MARK = "\ue000reft-rs-prompt\ue001"
_RESPONSE_MARK = "\ue000reft-rs-response\ue001"
# Contents that a template which transforms them (trims, escapes) renders
# differently from plain substitution.
_PROBES = [
    ("  padded prompt  ", "  padded response \n"),
    ("two\nlines\n", "\nlead"),
    ("{{ braces }} {% if x %}'quotes' \"double\"", "caf\u00e9 \u4e2d\u6587"),
    ("", ""),
]


class ReftDataset(torch.utils.data.Dataset):
    """Tokenized examples, their labels and their locations.

    Example ``i`` holds tokens ``tokens[offsets[i]:offsets[i + 1]]``, the
    first ``prompt_lengths[i]`` of them the prompt.

    Attributes:
        tokens: Every example's token ids, one after another (int32).
        offsets: Where each example starts, then the end (int64, ``n + 1``).
        prompt_lengths: Prompt tokens per example.
        labels: ``None`` for language modelling (the labels are the tokens
            with the prompt masked by -100) or one label per example for
            classification.
        locations: ``(groups, examples, positions)`` from
            :func:`reft_rs.positions.locate`, or ``None`` when no intervention
            reads locations. Examples take views of it, never copies.
        token_labels: Whether the examples carry per-token labels.
        encoder_decoder: For an encoder-decoder (T5, BART, ...): the prompt
            is the encoder's input and the response the decoder's target,
            so an example is ``{"input_ids": prompt, "labels": response}``
            (no locations: the model chooses each stack's positions from the
            batch's masks and labels, by the same rule).
        features: For a vision-language model: each example's image
            features as its processor made them (``pixel_values``, ...),
            added to its item and batched by :func:`pad_features`.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        prompt_lengths: np.ndarray,
        locations: np.ndarray | None,
        *,
        labels: Sequence[Any] | None = None,
        token_labels: bool = True,
        encoder_decoder: bool = False,
        features: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.features = None if features is None else [dict(f) for f in features]
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
        self.locations = locations
        self.labels = labels
        self.token_labels = token_labels and labels is None
        self.encoder_decoder = bool(encoder_decoder)
        if self.encoder_decoder and (not self.token_labels or locations is not None):
            raise ConfigError(
                "an encoder-decoder dataset holds prompt/response pairs without locations "
                "(the response is the decoder's target)"
            )
        count = len(self.prompt_lengths)
        if self.features is not None and len(self.features) != count:
            raise ConfigError(
                f"a dataset of {count} examples needs {count} feature sets, found {len(self.features)}"
            )
        if len(self.offsets) != count + 1 or (labels is not None and len(labels) != count):
            raise ConfigError(
                f"a dataset of {count} examples needs {count + 1} offsets and {count} labels, "
                f"found {len(self.offsets)} and {None if labels is None else len(labels)}"
            )

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        prompt_lengths: Sequence[int],
        locations: np.ndarray | None = None,
        *,
        labels: Sequence[Any] | None = None,
        token_labels: bool = True,
        features: Sequence[Mapping[str, np.ndarray]] | None = None,
    ) -> ReftDataset:
        """A dataset from lists of token ids (and, for a vision-language
        model, each example's image features)."""
        tokens, offsets = _flatten(sequences)
        return cls(
            tokens,
            offsets,
            np.asarray(prompt_lengths),
            locations,
            labels=labels,
            token_labels=token_labels,
            features=features,
        )

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example."""
        return np.diff(self.offsets)

    @property
    def input_ids(self) -> list[np.ndarray]:
        """Each example's token ids (int64 copies)."""
        return [self.tokens[a:b].astype(np.int64) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of a dataset of {len(self)}")
        index = index % len(self)
        ids = self.tokens[self.offsets[index] : self.offsets[index + 1]].astype(np.int64)
        if self.encoder_decoder:
            prompt = self.prompt_lengths[index]
            return {"input_ids": ids[:prompt], "labels": ids[prompt:]}
        item: dict[str, Any] = {"input_ids": ids}
        if self.token_labels:
            labels = ids.copy()
            labels[: self.prompt_lengths[index]] = IGNORE_INDEX
            item["labels"] = labels
        elif self.labels is not None:
            item["labels"] = self.labels[index]
        if self.locations is not None:
            item["locations"] = self.locations[:, index]
        if self.features is not None:
            item.update(self.features[index])
        return item

    def prompt_features(self, index: int) -> dict[str, np.ndarray]:
        """Example ``index``'s image features for its prompt alone (the
        per-token ones cut to the prompt), to generate from it."""
        if self.features is None:
            return {}
        length = self.offsets[index + 1] - self.offsets[index]
        prompt = self.prompt_lengths[index]
        return {
            key: value[:prompt] if value.ndim == 1 and len(value) == length else value
            for key, value in self.features[index].items()
        }

    def collate(
        self,
        indices: Sequence[int] | np.ndarray,
        pad_token_id: int,
        *,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        as_tensors: bool = True,
    ) -> dict[str, Any]:
        """The padded batch of examples ``indices``: what
        :class:`ReftDataCollator` makes of them, built without a loop."""
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', found {padding_side!r}")
        indices = np.ascontiguousarray(indices, dtype=np.int64)
        if self.encoder_decoder:
            collator = ReftDataCollator(
                pad_token_id, padding_side, pad_to_multiple_of, token_labels=True, encoder_decoder=True
            )
            out = collator.pad([self[int(i)] for i in indices])
            if as_tensors:
                return {k: torch.from_numpy(v) for k, v in out.items()}
            return out
        lengths = self.offsets[indices + 1] - self.offsets[indices]
        width = int(lengths.max()) if len(indices) else 0
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        left = padding_side == "left"
        ids, mask, token_labels = _core.pad_rows(
            self.tokens,
            self.offsets,
            self.prompt_lengths if self.token_labels else None,
            indices,
            width,
            int(pad_token_id),
            left,
        )
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if token_labels is not None:
            out["labels"] = token_labels
        elif self.labels is not None:
            out["labels"] = np.asarray([self.labels[i] for i in indices])
        if self.locations is not None:
            locations = self.locations[:, indices]
            if left:
                shift = (width - lengths)[None, :, None]
                locations = np.where(locations >= 0, locations + shift, locations)
            out["locations"] = np.ascontiguousarray(locations)
        if self.features is not None:
            out.update(pad_features([self.features[int(i)] for i in indices], lengths, width, left))
        if as_tensors:
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
        return out

    def batches(
        self,
        batch_size: int,
        pad_token_id: int,
        *,
        shuffle: bool = False,
        group_by_length: bool = False,
        seed: int = 0,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        drop_last: bool = False,
        as_tensors: bool = True,
    ) -> Batches:
        """Padded batches of the whole dataset, an iterable that a training
        loop can go over once per epoch (each epoch in a new order when
        ``shuffle``). ``group_by_length`` puts examples of similar length
        together (see :func:`length_grouped_batches`) to cut padding."""
        return Batches(
            self,
            batch_size,
            pad_token_id,
            shuffle=shuffle,
            group_by_length=group_by_length,
            seed=seed,
            padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of,
            drop_last=drop_last,
            as_tensors=as_tensors,
        )


def length_grouped_batches(
    lengths: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    mega_batch: int = 50,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Index batches of examples of similar length.

    Without ``shuffle`` every example is sorted by length (longest first)
    and cut into batches. With it the examples are shuffled, cut into groups
    of ``mega_batch`` batches, each group sorted by length and cut into
    batches, and the batches shuffled: padding falls almost as far as with
    a full sort, while every epoch still sees a new order.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, found {batch_size}")
    lengths = np.asarray(lengths)
    count = len(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, count, batch_size)]
    else:
        rng = np.random.default_rng(seed)
        order = rng.permutation(count)
        group = batch_size * max(mega_batch, 1)
        batches = []
        for start in range(0, count, group):
            chunk = order[start : start + group]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    return batches


class Batches:
    """Padded batches of a :class:`ReftDataset` (see :meth:`ReftDataset.batches`).

    Iterating again starts a new epoch: with ``shuffle`` each epoch gets a
    new order, drawn from ``seed`` and the epoch number.
    """

    def __init__(
        self,
        dataset: ReftDataset,
        batch_size: int,
        pad_token_id: int,
        *,
        shuffle: bool,
        group_by_length: bool,
        seed: int,
        padding_side: str,
        pad_to_multiple_of: int | None,
        drop_last: bool,
        as_tensors: bool,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, found {batch_size}")
        if pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; pass pad_token_id (e.g. the eos token id)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.drop_last = drop_last
        self.as_tensors = as_tensors
        self.epoch = 0

    def index_batches(self, epoch: int = 0) -> list[np.ndarray]:
        """The index batches of one epoch."""
        count = len(self.dataset)
        seed = self.seed + epoch
        if self.group_by_length:
            return length_grouped_batches(
                self.dataset.lengths,
                self.batch_size,
                shuffle=self.shuffle,
                seed=seed,
                drop_last=self.drop_last,
            )
        order = np.random.default_rng(seed).permutation(count) if self.shuffle else np.arange(count)
        batches = [order[i : i + self.batch_size] for i in range(0, count, self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        for indices in self.index_batches(epoch):
            yield self.dataset.collate(
                indices,
                self.pad_token_id,
                padding_side=self.padding_side,
                pad_to_multiple_of=self.pad_to_multiple_of,
                as_tensors=self.as_tensors,
            )


class LengthGroupedSampler(torch.utils.data.Sampler):
    """A batch sampler for ``DataLoader(batch_sampler=...)`` that groups
    examples of similar length (see :func:`length_grouped_batches`); a new
    order every epoch."""

    def __init__(self, lengths: np.ndarray, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        batches = length_grouped_batches(
            self.lengths, self.batch_size, shuffle=self.shuffle, seed=self.seed + epoch
        )
        for batch in batches:
            yield batch.tolist()


# ---------------------------------------------------------------- tokenization


def batch_tokenizer(tokenizer: Any) -> _core.BatchTokenizer | None:
    """The Rust batch tokenizer of a Hugging Face fast tokenizer (its
    ``tokenizer.json`` read by the ``tokenizers`` crate), or ``None`` for
    tokenizers that have none (slow ones)."""
    if isinstance(tokenizer, _core.BatchTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return _core.BatchTokenizer.from_json(backend.to_str())
    except ReftError:
        return None


def _renderer(tokenizer: Any, system_prompt: str | None) -> Callable[[str, str | None], str]:
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def render(prompt: str, response: str | None) -> str:
        messages = [*prefix, {"role": "user", "content": prompt}]
        if response is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False)

    return render


def chat_affixes(tokenizer: Any, system_prompt: str | None = None) -> tuple[str, str, str, str] | None:
    """``(prompt_before, prompt_after, response_before, response_after)``:
    the text the chat template puts around a prompt and a response, or
    ``None`` when the template does more than put text around them (trims
    or escapes the contents, or renders the prompt differently once a
    response follows), in which case each example must be rendered.

    Found by rendering sentinel contents, then checked on probe contents.
    """
    render = _renderer(tokenizer, system_prompt)
    try:
        prompt = render(_PROMPT_MARK, None)
        full = render(_PROMPT_MARK, _RESPONSE_MARK)
    except Exception:
        return None
    if prompt.count(_PROMPT_MARK) != 1 or not full.startswith(prompt) or full.count(_RESPONSE_MARK) != 1:
        return None
    before, after = prompt.split(_PROMPT_MARK)
    response_before, response_after = full[len(prompt) :].split(_RESPONSE_MARK)
    for p, r in _PROBES:
        try:
            if render(p, None) != before + p + after:
                return None
            if render(p, r) != before + p + after + response_before + r + response_after:
                return None
        except Exception:
            return None
    return before, after, response_before, response_after


def _chat_texts(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str] | None, system: str | None):
    """Each example rendered: prompt texts ending in the assistant turn's
    header, and the response texts that complete them."""
    render = _renderer(tokenizer, system)
    prompt_texts, response_texts = [], []
    for index, prompt in enumerate(prompts):
        prompt_text = render(prompt, None)
        prompt_texts.append(prompt_text)
        if responses is not None:
            full = render(prompt, responses[index])
            if full.startswith(prompt_text):
                response_texts.append(full[len(prompt_text) :])
            else:
                response_texts.append(responses[index] + (tokenizer.eos_token or ""))
    return prompt_texts, (response_texts if responses is not None else None)


def _use_template(tokenizer: Any, chat_template: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise ConfigError("chat_template=True, but the tokenizer has no chat template")
    return has if chat_template is None else chat_template


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    *,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
    encoder: _core.BatchTokenizer | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, offsets, prompt_lengths)`` of ``prompt + response`` pairs.

    Prompt and response are tokenized separately and joined, so the prompt's
    tokens are exactly those a generation from the prompt would see. With a
    chat template the prompt is the user's turn and the opening of the
    assistant's, the response the assistant's words and the end of the turn;
    without one the prompt gets the tokenizer's special tokens (BOS) and the
    response ends with EOS.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompts: The prompts.
        responses: The responses, or ``None`` (the prompt is everything).
        chat_template: Wrap prompts (and responses) in the tokenizer's chat
            template; by default when the tokenizer has one.
        system_prompt: A system message for the chat template.
        max_length: Cut sequences to this many tokens (the response first).
        encoder: A :func:`batch_tokenizer` of ``tokenizer`` made earlier.
    """
    if responses is not None and len(responses) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses")
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length must be at least 1, found {max_length}")
    prompts = list(prompts)
    responses = None if responses is None else list(responses)
    eos = tokenizer.eos_token or ""
    affixes: tuple[str, str, str, str] = ("", "", "", eos)
    special = True
    if _use_template(tokenizer, chat_template):
        special = False
        found = chat_affixes(tokenizer, system_prompt)
        if found is not None:
            affixes = found
        else:
            prompts, response_texts = _chat_texts(tokenizer, prompts, responses, system_prompt)
            responses = response_texts
            affixes = ("", "", "", "")
    encoder = encoder or batch_tokenizer(tokenizer)
    if encoder is not None:
        return encoder.encode_pairs(prompts, responses, affixes, special, max_length)
    return _encode_pairs_python(tokenizer, prompts, responses, affixes, special, max_length)


def _encode_pairs_python(tokenizer, prompts, responses, affixes, special, max_length):
    """:func:`encode_pairs` through the tokenizer's own batch call, for
    tokenizers without a ``tokenizer.json`` (slow ones)."""
    before, after, response_before, response_after = affixes
    prompt_ids = tokenizer([before + p + after for p in prompts], add_special_tokens=special)["input_ids"]
    if responses is None:
        sequences = [list(ids) for ids in prompt_ids]
    else:
        texts = [response_before + r + response_after for r in responses]
        response_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    prompt_lengths = np.fromiter((len(p) for p in prompt_ids), dtype=np.int64, count=len(prompt_ids))
    if max_length is not None:
        sequences = [s[:max_length] for s in sequences]
        prompt_lengths = np.minimum(prompt_lengths, max_length)
    tokens, offsets = _flatten(sequences)
    return tokens, offsets, prompt_lengths


def _flatten(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of token ids as one int32 array and ``n + 1`` offsets."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=int(offsets[-1]))
    return tokens, offsets


def tokenize_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    *,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of ``prompt + response`` per example (lists), and the prompt
    lengths; :func:`encode_pairs` gives the same as flat arrays."""
    tokens, offsets, prompt_lengths = encode_pairs(
        tokenizer,
        prompts,
        responses,
        chat_template=chat_template,
        system_prompt=system_prompt,
        max_length=max_length,
    )
    flat = tokens.tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())], prompt_lengths


def _position_rule(
    config: ReftConfig | None, positions: str | None, share_weights: bool, include_last: bool | None
) -> tuple[str | None, bool, bool]:
    """``(positions, share_weights, include_last)`` for the data: the
    config's when there is one (a different ``include_last`` given beside it
    is an error: the checkpoint records the config's, and inference follows
    it), else the arguments."""
    if config is None:
        return positions, share_weights, True if include_last is None else bool(include_last)
    shared = config.shared_positions()
    if shared is None:
        return None, False, True
    if include_last is not None and bool(include_last) != shared[2]:
        raise ConfigError(
            f"include_last={include_last} disagrees with the config's interventions (include_last={shared[2]}); "
            "set it on the config instead (InterventionConfig(include_last=...) or "
            "ReftConfig.for_layers(..., include_last=...)), so that inference edits the same positions"
        )
    return shared


def make_dataset(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    *,
    labels: Sequence[Any] | None = None,
    config: ReftConfig | None = None,
    positions: str | None = None,
    share_weights: bool = False,
    include_last: bool | None = None,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
    encoder: _core.BatchTokenizer | None = None,
    encoder_decoder: bool | None = None,
    images: Sequence[Any] | None = None,
) -> ReftDataset:
    """Builds a :class:`ReftDataset` for language modelling or classification.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompts: The prompts (or, for classification, the texts).
        responses: The responses to learn; the loss covers them only.
        labels: For classification: one label per text (no ``responses``).
        config: The :class:`ReftConfig` to train; its interventions' position
            spec, ``share_weights`` and ``include_last`` are used. Or give
            ``positions``.
        positions, share_weights: The position spec when there is no config.
        include_last: Without a config, whether the last prompt token may be
            chosen (default ``True``; pyreft's library leaves it out:
            ``False``). With a config it is the config's; passing a
            different value is an error.
        chat_template, system_prompt, max_length, encoder: See
            :func:`encode_pairs`. Classification texts go without the chat
            template unless ``chat_template=True``.
        encoder_decoder: Pairs for an encoder-decoder (T5, BART, ...): the
            prompt is the encoder's input, the response the decoder's
            target, each tokenized on its own with the tokenizer's special
            tokens (and cut to ``max_length``), with no chat template unless
            ``chat_template=True``. By default when ``config`` names towers.
        images: For a vision-language model: each prompt's image or list
            of images (file paths or PIL images), with ``tokenizer`` the
            model's processor (``transformers.AutoProcessor``). Each prompt
            becomes the user's turn of the processor's chat template, its
            images before its text; labels are -100 over the whole prompt,
            image tokens included; positions are chosen from the token ids
            (image specs among the image tokens, others among the text, see
            :func:`reft_rs.positions.locate_in_tokens`); each example keeps
            the image features the processor made.
    """
    if responses is not None and labels is not None:
        raise ConfigError("give responses (language modelling) or labels (classification), not both")
    if labels is not None and len(labels) != len(prompts):
        raise ConfigError(f"{len(prompts)} texts but {len(labels)} labels")
    if images is not None:
        if responses is None:
            raise ConfigError("examples with images learn responses: give the responses")
        return _image_dataset(
            tokenizer,
            prompts,
            responses,
            images,
            config,
            positions,
            share_weights,
            include_last,
            system_prompt,
            max_length,
        )
    if encoder_decoder is None:
        encoder_decoder = config is not None and any(
            item.tower in ("encoder", "decoder") for item in config.interventions
        )
    if encoder_decoder:
        if responses is None:
            raise ConfigError(
                "an encoder-decoder learns responses: give the labels as response texts "
                "(a class name as the reply) rather than class indices"
            )
        return _seq2seq_dataset(
            tokenizer, prompts, responses, chat_template, system_prompt, max_length, encoder
        )
    spec, share_weights, include_last = _position_rule(config, positions, share_weights, include_last)
    tokens, offsets, prompt_lengths = encode_pairs(
        tokenizer,
        prompts,
        responses,
        chat_template=chat_template if responses is not None or chat_template else False,
        system_prompt=system_prompt,
        max_length=max_length,
        encoder=encoder,
    )
    locations = None
    if spec is not None:
        locations = locate(prompt_lengths, spec, share_weights=share_weights, include_last=include_last)
    return ReftDataset(
        tokens,
        offsets,
        prompt_lengths,
        locations,
        labels=labels,
        token_labels=responses is not None,
    )


def _image_dataset(
    processor: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    images: Sequence[Any],
    config: ReftConfig | None,
    positions: str | None,
    share_weights: bool,
    include_last: bool | None,
    system_prompt: str | None,
    max_length: int | None,
) -> ReftDataset:
    """Prompt/response pairs with images, through a vision-language model's
    processor (:mod:`reft_rs.training.images`)."""
    from .images import encode_image_pairs, image_token_of

    spec, share_weights, include_last = _position_rule(config, positions, share_weights, include_last)
    sequences, prompt_lengths, features = encode_image_pairs(
        processor, prompts, responses, images, system_prompt=system_prompt, max_length=max_length
    )
    locations = None
    if spec is not None:
        locations = locate_in_tokens(
            sequences,
            prompt_lengths,
            spec,
            image_token_of(processor),
            share_weights=share_weights,
            include_last=include_last,
            sequence_lengths=prompt_lengths,
        )
    tokens, offsets = _flatten(sequences)
    return ReftDataset(tokens, offsets, prompt_lengths, locations, features=features)


def _seq2seq_dataset(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    chat_template: bool | None,
    system_prompt: str | None,
    max_length: int | None,
    encoder: _core.BatchTokenizer | None,
) -> ReftDataset:
    """Prompt/response pairs for an encoder-decoder: each example's tokens
    are its encoder input then its decoder target (tokenized apart)."""
    if len(responses) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(responses)} responses")
    encoder = encoder or batch_tokenizer(tokenizer)
    options = {"system_prompt": system_prompt, "max_length": max_length, "encoder": encoder}
    sources, source_offsets, _ = encode_pairs(
        tokenizer, prompts, chat_template=bool(chat_template), **options
    )
    targets, target_offsets, _ = encode_pairs(tokenizer, responses, chat_template=False, **options)
    source_lengths, target_lengths = np.diff(source_offsets), np.diff(target_offsets)
    if len(target_lengths) and int(target_lengths.min()) == 0:
        empty = int(np.flatnonzero(target_lengths == 0)[0])
        raise ConfigError(f"response {empty} has no tokens: the decoder would have nothing to learn")
    offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
    np.cumsum(source_lengths + target_lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=np.int32)
    # Each token's place: its example's start, plus its place in the prompt
    # (or after the prompt, in the response).
    tokens[np.repeat(offsets[:-1] - source_offsets[:-1], source_lengths) + np.arange(len(sources))] = sources
    target_starts = offsets[:-1] + source_lengths - target_offsets[:-1]
    tokens[np.repeat(target_starts, target_lengths) + np.arange(len(targets))] = targets
    return ReftDataset(tokens, offsets, source_lengths, None, encoder_decoder=True)


def stream_batches(
    tokenizer: Any,
    records: Iterable[Mapping[str, Any]],
    batch_size: int,
    *,
    config: ReftConfig | None = None,
    positions: str | None = None,
    share_weights: bool = False,
    include_last: bool | None = None,
    chunk_size: int = 16384,
    group_by_length: bool = True,
    shuffle: bool = False,
    seed: int = 0,
    pad_token_id: int | None = None,
    padding_side: str = "right",
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
    as_tensors: bool = True,
) -> Iterator[dict[str, Any]]:
    """Padded batches from records read one chunk at a time, for datasets
    larger than memory: ``chunk_size`` records are tokenized and located at
    once, batched (by length within the chunk when ``group_by_length``)
    and handed out before the next chunk is read.

    Args:
        records: Mappings with ``prompt`` and ``response``, or ``text`` and
            ``label`` (see :func:`reft_rs.io.records.read_records`).
        batch_size, chunk_size: Examples per batch and per chunk.
        pad_token_id: By default the tokenizer's pad token (else its EOS).
        Others: as in :func:`make_dataset` and :meth:`ReftDataset.batches`.
    """
    if chunk_size < batch_size:
        raise ConfigError(f"chunk_size ({chunk_size}) must be at least batch_size ({batch_size})")
    if pad_token_id is None:
        pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    encoder = batch_tokenizer(tokenizer)
    iterator = iter(records)
    for number in itertools.count():
        chunk = list(itertools.islice(iterator, chunk_size))
        if not chunk:
            return
        options: dict[str, Any] = {
            "config": config,
            "positions": positions,
            "share_weights": share_weights,
            "include_last": include_last,
            "chat_template": chat_template,
            "system_prompt": system_prompt,
            "max_length": max_length,
            "encoder": encoder,
        }
        if "response" in chunk[0]:
            texts, responses = [r["prompt"] for r in chunk], [r["response"] for r in chunk]
            dataset = make_dataset(tokenizer, texts, responses, **options)
        else:
            texts, labels = [r["text"] for r in chunk], [r["label"] for r in chunk]
            dataset = make_dataset(tokenizer, texts, labels=labels, **options)
        yield from dataset.batches(
            batch_size,
            pad_token_id,
            shuffle=shuffle,
            group_by_length=group_by_length,
            seed=seed + number,
            padding_side=padding_side,
            as_tensors=as_tensors,
        )


def _per_token(example: dict[str, Any]) -> bool:
    labels = np.asarray(example["labels"])
    return (
        labels.ndim == 1
        and labels.dtype.kind in "iu"
        and len(labels) == len(example["input_ids"])
        and bool((labels == IGNORE_INDEX).any())
    )


#: Keys of an example that the collators batch themselves.
_BATCH_KEYS = frozenset({"input_ids", "attention_mask", "labels", "locations"})


def pad_features(
    features: Sequence[Mapping[str, np.ndarray]], lengths: np.ndarray, width: int, left: bool
) -> dict[str, np.ndarray]:
    """A batch of examples' image features, laid out as the processor lays
    out a batch: one value per token (token types) padded with 0 like the
    ids; anything else (``pixel_values``, ``image_grid_thw``,
    ``pixel_attention_mask``...) joined along its first axis, the other axes
    padded with zeros to the largest (Idefics3's images per example)."""
    out: dict[str, np.ndarray] = {}
    keys = list(features[0]) if features else []
    for key in keys:
        if any(key not in f for f in features):
            raise ConfigError(f"some examples of the batch have {key!r} and others do not")
        values = [np.asarray(f[key]) for f in features]
        if all(v.ndim == 1 and len(v) == n for v, n in zip(values, lengths.tolist())):
            padded = np.zeros((len(values), width), dtype=values[0].dtype)
            for row, (value, n) in enumerate(zip(values, lengths.tolist())):
                start = width - n if left else 0
                padded[row, start : start + n] = value
            out[key] = padded
            continue
        if len({v.ndim for v in values}) != 1 or values[0].ndim == 0:
            raise ConfigError(f"the examples' {key!r} differ in rank; they cannot be batched")
        shape = [max(v.shape[axis] for v in values) for axis in range(1, values[0].ndim)]
        parts = []
        for value in values:
            if list(value.shape[1:]) != shape:
                grown = np.zeros((value.shape[0], *shape), dtype=value.dtype)
                grown[tuple(slice(0, d) for d in value.shape)] = value
                value = grown
            parts.append(value)
        out[key] = np.concatenate(parts, axis=0)
    return out


def _is_target(example: dict[str, Any]) -> bool:
    """Whether an example's labels are an encoder-decoder's target: a list
    of token ids that is not the input with its prompt masked."""
    if "labels" not in example:
        return False
    labels = np.asarray(example["labels"])
    return labels.ndim == 1 and labels.dtype.kind in "iu" and not _per_token(example)


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
        encoder_decoder: Whether ``labels`` are an encoder-decoder's target
            (padded with -100 on the right, whatever ``padding_side``). By
            default (with ``token_labels`` unset and no locations) when they
            are a list of ids that is not the input with its prompt masked.

    Returns (when called): ``input_ids``, ``attention_mask``, ``labels`` (if
    the examples have them) and ``locations`` ``(groups, batch, positions)``,
    moved right by each example's padding when padding is on the left, and
    any other field of the examples (a vision-language model's image
    features) batched by :func:`pad_features`.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    token_labels: bool | None = None
    encoder_decoder: bool | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', found {self.padding_side!r}")
        if self.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; pass pad_token_id (e.g. the eos token id)")

    def _width(self, lengths: np.ndarray) -> int:
        width = int(lengths.max()) if len(lengths) else 0
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def pad(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        """An encoder-decoder's batch as arrays: the prompts padded (on
        ``padding_side``) with their attention mask, the targets padded on
        the right with -100."""
        batch = len(examples)
        lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
        width = self._width(lengths)
        ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        targets = [np.asarray(e["labels"], dtype=np.int64) for e in examples]
        labels = np.full((batch, self._width(np.array([len(t) for t in targets]))), IGNORE_INDEX, np.int64)
        for row, example in enumerate(examples):
            start = width - lengths[row] if self.padding_side == "left" else 0
            ids[row, start : start + lengths[row]] = example["input_ids"]
            mask[row, start : start + lengths[row]] = 1
            labels[row, : len(targets[row])] = targets[row]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoder_decoder = self.encoder_decoder
        if encoder_decoder is None:  # targets of their own length: a decoder's
            encoder_decoder = (
                bool(examples)
                and self.token_labels is None
                and "locations" not in examples[0]
                and _is_target(examples[0])
            )
        if encoder_decoder:
            return {k: torch.from_numpy(v) for k, v in self.pad(examples).items()}
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
        # Arrays beyond the text's (a vision-language model's image features);
        # other fields (an id, the source text) are left out as before.
        features = [
            {k: v for k, v in e.items() if k not in _BATCH_KEYS and isinstance(v, (np.ndarray, torch.Tensor))}
            for e in examples
        ]
        if features and features[0]:
            for key, value in pad_features(features, lengths, width, left).items():
                out[key] = torch.from_numpy(np.ascontiguousarray(value))
        return out


class StreamedEpochs:
    """The batches of a dataset file, read afresh chunk by chunk every time
    it is iterated (an epoch of :func:`reft_rs.train`), shuffled within the
    file's chunks with ``seed``. Records are prompt/response pairs, or
    text/label ones taught as prompt → label.

    The other arguments are those of :func:`stream_batches`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tokenizer: Any,
        batch_size: int,
        *,
        config: ReftConfig | None = None,
        chunk_size: int = 16384,
        seed: int = 0,
        max_length: int | None = None,
        system_prompt: str | None = None,
        chat_template: bool | None = None,
    ) -> None:
        self.path, self.tokenizer, self.batch_size = path, tokenizer, batch_size
        self.config, self.chunk_size, self.seed = config, chunk_size, seed
        self.max_length, self.system_prompt, self.chat_template = max_length, system_prompt, chat_template

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from ..io.records import read_records

        records = (
            r if "response" in r else {"prompt": r["text"], "response": str(r["label"])}
            for r in read_records(self.path)
        )
        yield from stream_batches(
            self.tokenizer,
            records,
            self.batch_size,
            config=self.config,
            chunk_size=self.chunk_size,
            shuffle=True,
            seed=self.seed,
            max_length=self.max_length,
            system_prompt=self.system_prompt,
            chat_template=self.chat_template,
        )
