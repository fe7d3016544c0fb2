"""Prompt/response pairs with images, through a vision-language model's
processor: what :func:`reft_rs.make_dataset` does when given ``images``.

Each prompt is the user's turn of the processor's chat template, its images
first and its text after (or, without a template, the processor's image
token once per image before the text); the processor expands the image
tokens and makes the image features (``pixel_values`` and whatever else the
model reads: ``image_grid_thw``, ``pixel_attention_mask``, token types...).
The response is the assistant's words and the end of its turn, tokenized on
its own, so its labels are exactly the reply the model should write.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DatasetError

__all__ = ["encode_image_pairs", "encode_prompt", "image_token_of", "open_image", "render_prompt"]

_RESPONSE_MARK = "\ue000reft-rs-response\ue001"
#: Keys that every batch has and the collators pad themselves.
_TEXT_KEYS = ("input_ids", "attention_mask")


def image_token_of(processor: Any) -> int:
    """The id of the processor's image placeholder token."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(processor, name, None)
        if isinstance(value, (int, np.integer)):
            return int(value)
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if isinstance(token, str) and tokenizer is not None:
        value = tokenizer.convert_tokens_to_ids(token)
        if isinstance(value, int) and value != getattr(tokenizer, "unk_token_id", None):
            return value
    raise ConfigError(f"{type(processor).__name__} names no image token (image_token / image_token_id)")


def open_image(image: Any) -> Any:
    """A PIL image from a path or a PIL image (converted to RGB)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise DatasetError(f"{os.fspath(image)}: not a readable image ({error})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise DatasetError(f"an image is a file path or a PIL image, found {type(image).__name__}")


def _user_turn(prompt: str, images: int) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": prompt}]}


def _render(processor: Any, prompt: str, images: int, system_prompt: str | None) -> tuple[str, str]:
    """The prompt's text (images as the processor's placeholder) and what the
    template writes after the assistant's words."""
    template = getattr(processor, "chat_template", None)
    if not template:
        token = getattr(processor, "image_token", None)
        if not isinstance(token, str):
            raise ConfigError(f"{type(processor).__name__} has neither a chat template nor an image token")
        eos = getattr(processor.tokenizer, "eos_token", None) or ""
        return token * images + prompt, eos
    messages = (
        []
        if system_prompt is None
        else [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
    )
    messages.append(_user_turn(prompt, images))
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reply = {"role": "assistant", "content": [{"type": "text", "text": _RESPONSE_MARK}]}
    full = processor.apply_chat_template([*messages, reply], tokenize=False)
    if not full.startswith(text) or full.count(_RESPONSE_MARK) != 1:
        raise ConfigError(
            f"{type(processor).__name__}'s chat template does not render a reply after the prompt "
            "it renders alone; reft_rs cannot tell where the response starts"
        )
    return text, full.split(_RESPONSE_MARK, 1)[1]


def render_prompt(processor: Any, prompt: str, images: int = 0, system_prompt: str | None = None) -> str:
    """The text of a prompt with ``images`` pictures (their placeholders
    before the words) as the processor's chat template renders the user's
    turn and the opening of the assistant's."""
    return _render(processor, prompt, images, system_prompt)[0]


def encode_prompt(
    processor: Any, prompt: str, images: Any, system_prompt: str | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """``(ids, features, end)``: a prompt with its image(s) (a path, a PIL
    image, or a list of them) as the processor encodes the chat template's
    user turn, its image features (per-token ones 1-D), and the text the
    template puts after the assistant's reply."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise ConfigError(
            "examples with images need the model's processor (transformers.AutoProcessor), "
            f"not {type(processor).__name__}"
        )
    pictures = list(images) if isinstance(images, (list, tuple)) else [images]
    if not pictures:
        raise DatasetError("a prompt with images needs at least one image")
    text, end = _render(processor, prompt, len(pictures), system_prompt)
    encoded = processor(images=[open_image(p) for p in pictures], text=[text], return_tensors="np")
    ids = np.asarray(encoded["input_ids"][0], dtype=np.int64)
    features = {}
    for key, value in encoded.items():
        if key in _TEXT_KEYS:
            continue
        value = np.asarray(value)
        features[key] = value[0] if value.ndim == 2 and value.shape == (1, len(ids)) else value
    return ids, features, end


def encode_image_pairs(
    processor: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    images: Sequence[Any],
    *,
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray, list[dict[str, np.ndarray]]]:
    """``(sequences, prompt_lengths, features)``: each example's token ids
    (prompt then response), its prompt length, and the image features the
    processor made for it, as arrays with the processor's leading axis
    (one-token-per-position features, such as token types, as 1-D arrays).

    ``images[i]`` is one image (a path or a PIL image) or a list of them
    for prompt ``i``. ``max_length`` cuts the response (never the prompt,
    whose image tokens must all stay).
    """
    if getattr(processor, "tokenizer", None) is None or not hasattr(processor, "image_processor"):
        raise ConfigError(
            "examples with images need the model's processor (transformers.AutoProcessor), "
            f"not {type(processor).__name__}"
        )
    tokenizer = processor.tokenizer
    if not (len(prompts) == len(responses) == len(images)):
        raise ConfigError(f"{len(prompts)} prompts, {len(responses)} responses and {len(images)} images")
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length must be at least 1, found {max_length}")
    sequences, prompt_lengths, features = [], [], []
    for index, (prompt, response, pictures) in enumerate(zip(prompts, responses, images)):
        if isinstance(pictures, (list, tuple)) and not pictures:
            raise DatasetError(f"example {index} has no image")
        ids, prompt_features, end = encode_prompt(processor, prompt, pictures, system_prompt)
        reply = np.asarray(tokenizer(response + end, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if max_length is not None:
            if len(ids) > max_length:
                raise DatasetError(
                    f"example {index}'s prompt alone has {len(ids)} tokens (its images included), "
                    f"more than max_length={max_length}"
                )
            reply = reply[: max_length - len(ids)]
        extra = {}
        for key, value in prompt_features.items():
            if value.ndim == 1 and len(value) == len(ids):
                # One value per prompt token (token types): the response's are 0.
                value = np.concatenate([value, np.zeros(len(reply), dtype=value.dtype)])
            extra[key] = value
        sequences.append(np.concatenate([ids, reply]))
        prompt_lengths.append(len(ids))
        features.append(extra)
    return sequences, np.asarray(prompt_lengths, dtype=np.int64), features
