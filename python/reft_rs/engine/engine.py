"""The Rust CPU inference engine: :class:`Engine`. Needs neither torch nor
transformers.

Example::

    engine = reft_rs.Engine("SmolLM2-135M-Instruct/", reft="reft-quickstart/checkpoint", threads=2)
    print(engine.chat([{"role": "user", "content": "What colour is the sky?"}], max_new_tokens=32))
    for piece in engine.stream("Once upon a time", max_new_tokens=20):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .. import _core
from ..errors import InvalidArgumentError
from .sampling import SamplingParams, check_adapter, check_count, check_strength, check_token_ids

__all__ = ["Engine", "kernel_isa", "read_gguf_tensor"]

Messages = Sequence[Mapping[str, Any]]


class Engine:
    """A model on the CPU with optional interventions, in Rust.

    Args:
        model_path: A Hugging Face model folder (``config.json``,
            ``model.safetensors`` or a sharded index, ``tokenizer.json``) or a
            GGUF file (quantized or not): Llama (with every rope scaling of
            Llama 3.x and Qwen long-context configs), Mistral, Qwen2, Qwen3,
            Gemma, Gemma 2, Gemma 3, Phi-3 / Phi-4-mini, SmolLM and GPT-2.
        reft: A reft_rs checkpoint folder to apply (``save_pretrained``'s
            output); refused if it was trained on a model of another type,
            width or depth.
        threads: Threads for this engine (default: one per core).
        dequantize: GGUF only: expand the quantized matrices to float32 when
            loading (what transformers computes from the file; several times
            the memory, and slower).
        int8_activations: GGUF only: round the activations to 8-bit blocks
            in each product with quantized weights, as llama.cpp does. By
            default they are rounded to 16 bits, at the same speed, which
            keeps the results within about 1e-3 of the dequantized float32
            model's (so a checkpoint trained in torch on those weights gives
            the same replies).

    Raises:
        ModelNotFoundError, ModelLoadError, UnsupportedModelError: for the model.
        CheckpointError, IncompatibleModelError: for the checkpoint.

    The interpreter is released while the engine computes, and one engine
    may serve several Python threads at once.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        reft: str | os.PathLike[str] | None = None,
        *,
        threads: int | None = None,
        dequantize: bool = False,
        int8_activations: bool = False,
    ) -> None:
        if threads is not None:
            threads = check_count("threads", threads, 1)
        self._engine = _core.Engine(
            os.fspath(model_path),
            None if reft is None else os.fspath(reft),
            threads,
            bool(dequantize),
            bool(int8_activations),
        )
        self.model_path = os.fspath(model_path)
        self.reft_path = None if reft is None else os.fspath(reft)

    # ------------------------------------------------------------------ facts

    @property
    def model_type(self) -> str:
        return self._engine.model_info[0]

    @property
    def hidden_size(self) -> int:
        return self._engine.model_info[1]

    @property
    def num_hidden_layers(self) -> int:
        return self._engine.model_info[2]

    @property
    def vocab_size(self) -> int:
        return self._engine.model_info[3]

    @property
    def quantized(self) -> bool:
        """Whether the weights are GGUF block-quantized."""
        return self._engine.model_info[4]

    @property
    def context_length(self) -> int:
        """Positions the model has: the longest prompt plus reply."""
        return self._engine.context_length

    @property
    def core(self) -> Any:
        """The bindings' engine (``reft_rs._core.Engine``) this wraps, which a
        :class:`reft_rs.Scheduler` shares."""
        return self._engine

    @property
    def eos_token_ids(self) -> list[int]:
        return self._engine.eos_token_ids

    @property
    def has_tokenizer(self) -> bool:
        return self._engine.has_tokenizer

    @property
    def has_chat_template(self) -> bool:
        return self._engine.has_chat_template

    @property
    def reft_config(self) -> dict[str, Any] | None:
        """The applied checkpoint's config, or ``None``."""
        text = self._engine.reft_config_json
        return None if text is None else json.loads(text)

    def __repr__(self) -> str:
        kind = "GGUF" if self.quantized else "float32"
        reft = f", reft={self.reft_path!r}" if self.reft_path else ""
        return (
            f"Engine({self.model_path!r}{reft}: {self.model_type}, {self.num_hidden_layers} layers, {kind})"
        )

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Loads the reft_rs checkpoint at ``path`` as adapter ``name``.

        ``path`` may also be a llama.cpp control-vector file (``.gguf``,
        needs the ``gguf`` package): its directions become ``steer`` edits
        on this model, as :func:`reft_rs.io.control_vector.import_control_vector`
        writes them, so one request can be steered by it while the next uses
        another vector or none (llama.cpp applies one vector to every
        request).

        Calls that pass ``adapter=name`` run with it from then on, beside
        calls with other adapters or none. Refused (``IncompatibleModelError``)
        for a checkpoint trained on another model, and for a name already
        loaded (``InvalidArgumentError``).
        """
        if not isinstance(name, str):
            raise InvalidArgumentError(f"adapter name must be a string, found {type(name).__name__}")
        path = os.fspath(path)
        if os.path.isfile(path) and path.lower().endswith(".gguf"):
            from ..io.control_vector import import_control_vector

            model = {
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "model_type": self.model_type,
            }
            with tempfile.TemporaryDirectory() as folder:
                converted = os.path.join(folder, "control-vector")
                import_control_vector(path, converted, base_model=model)
                self._engine.add_adapter(name, converted)
            return
        self._engine.add_adapter(name, path)

    def remove_adapter(self, name: str) -> None:
        """Unloads adapter ``name``; generations already running with it finish with it."""
        self._engine.remove_adapter(name)

    @property
    def adapters(self) -> dict[str, dict[str, Any]]:
        """The loaded adapters: name to checkpoint config."""
        return {name: json.loads(config) for name, config in self._engine.adapters()}

    # ------------------------------------------------------------------ text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, as ``tokenizer(text)["input_ids"]``."""
        return self._engine.encode(text, add_special_tokens)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens left out."""
        return self._engine.decode(check_token_ids("token_ids", token_ids))

    def apply_chat_template(self, messages: Messages | str, add_generation_prompt: bool = True) -> str:
        """``messages`` rendered with the model's chat template."""
        return self._engine.apply_chat_template(json.dumps(_messages(messages)), add_generation_prompt)

    # ------------------------------------------------------------------ compute

    def logits(
        self, token_ids: Sequence[int] | np.ndarray, *, adapter: str | None = None, strength: float = 1.0
    ) -> np.ndarray:
        """Float32 logits ``(len, vocab)`` of every position of one sequence,
        interventions applied (the whole sequence counts as the prompt).
        ``adapter`` names a loaded adapter (default: the engine's own
        checkpoint); ``strength`` scales the edits as in :meth:`generate`."""
        ids = check_token_ids("token_ids", token_ids)
        if not ids:
            raise InvalidArgumentError("token_ids is empty")
        return self._engine.logits(ids, check_adapter(adapter), check_strength(strength))

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        intervene_on_generated: bool = False,
        ignore_eos: bool = False,
        add_special_tokens: bool = True,
        adapter: str | Sequence[str | None] | None = None,
        strength: float = 1.0,
    ) -> list[str]:
        """Continues each prompt as is (no chat template; see :meth:`chat`).

        Args:
            prompts: One text or a list; a list runs as one batch, each prompt
                getting the tokens it gets alone.
            max_new_tokens: Most new tokens per prompt.
            temperature: 0 for greedy decoding, else the sampling temperature.
            top_k, top_p: Sampling filters.
            seed: Sampling seed: the same seed gives the same tokens.
            stop: Text(s) that end a prompt's generation; the result is cut
                before the first.
            intervene_on_generated: Also edit every generated token with the
                position-based interventions.
            ignore_eos: Keep generating past end-of-sequence tokens.
            add_special_tokens: Tokenize prompts as ``tokenizer(prompt)`` does.
            adapter: A loaded adapter's name for every prompt, or one name
                (or ``None``) per prompt; ``None`` runs with the checkpoint
                the engine was loaded with, if any.
            strength: The edit strength α: each edited state becomes
                h + α·(Φ(h) − h) (1 the trained edit, 0 the base model,
                negative reverses a steering vector).

        Returns:
            The new text of each prompt (a list even for one prompt).
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in texts):
            raise InvalidArgumentError("prompts must be strings; use generate_ids for token ids")
        options = SamplingParams(
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            intervene_on_generated,
            ignore_eos,
            strength,
        )
        return self._engine.generate_text(texts, options, add_special_tokens, _adapters(adapter, len(texts)))

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        intervene_on_generated: bool = False,
        ignore_eos: bool = False,
        adapter: str | Sequence[str | None] | None = None,
        strength: float = 1.0,
    ) -> list[list[int]]:
        """As :meth:`generate`, on token ids: the new ids of each prompt
        (end-of-sequence tokens left out). Works without a tokenizer."""
        ids = [check_token_ids(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
        options = SamplingParams(
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            intervene_on_generated,
            ignore_eos,
            strength,
        )
        return self._engine.generate_ids(ids, options, _adapters(adapter, len(ids)))

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        intervene_on_generated: bool = False,
        ignore_eos: bool = False,
        tokens: bool = False,
        adapter: str | None = None,
        strength: float = 1.0,
    ) -> Iterator[str] | Iterator[int]:
        """Generates for one prompt a token at a time.

        Yields the new text of each step (``tokens=True``: the token ids),
        as soon as it is computed; joined, the pieces equal
        :meth:`generate`'s result.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else check_token_ids("prompt", prompt)
        options = SamplingParams(
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            intervene_on_generated,
            ignore_eos,
            strength,
        )
        stream = self._engine.stream_ids(ids, options, check_adapter(adapter))
        if tokens:
            return (token for token, _ in stream if token is not None)
        return (piece for _, piece in stream if piece)

    def chat(
        self,
        messages: Messages | str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        intervene_on_generated: bool = False,
        adapter: str | None = None,
        strength: float = 1.0,
    ) -> str:
        """The assistant's reply to a conversation, formatted with the
        model's chat template.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``, or one
                user message as a string.
            Others: as for :meth:`generate`.
        """
        prompt = self.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stop,
            intervene_on_generated=intervene_on_generated,
            add_special_tokens=False,
            adapter=adapter,
            strength=strength,
        )[0]


def _adapters(adapter: Any, count: int) -> list[str | None]:
    """One adapter name (or None) per prompt; [] when no prompt names one."""
    if adapter is None:
        return []
    if isinstance(adapter, str):
        return [adapter] * count
    names = [check_adapter(a) for a in adapter]
    if len(names) != count:
        raise InvalidArgumentError(f"{len(names)} adapters given for {count} prompts")
    return names


def _messages(messages: Messages | str) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise InvalidArgumentError(f"messages[{i}] must be a mapping with 'role' and 'content'")
        out.append(dict(message))
    return out


def read_gguf_tensor(path: str | os.PathLike[str], name: str) -> np.ndarray:
    """Tensor ``name`` of the GGUF file at ``path`` as a float32 array of its
    shape (outermost dimension first), dequantized by the engine's own
    readers: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K.
    Other types raise :class:`reft_rs.errors.ModelLoadError` naming the
    tensor and its type."""
    shape, values = _core.read_gguf_tensor(os.fspath(path), name)
    return values.reshape(shape)


def kernel_isa() -> str:
    """The instruction set the engine's quantized and float16 kernels use on
    this CPU: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return _core.kernel_isa()
