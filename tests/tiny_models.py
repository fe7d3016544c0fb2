"""Tiny random Hugging Face models built from configs, one per family.

Small enough that a forward pass takes milliseconds; float64 where tests
compare padded and unpadded batches exactly.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 96
HIDDEN = 32
LAYERS = 3

DECODERS = ("llama", "qwen2", "gemma", "gpt2")
ENCODERS = ("bert", "roberta")
FAMILIES = DECODERS + ENCODERS


def config_for(family: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, pad_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common,
        )
    if family == "gemma":
        return transformers.GemmaConfig(
            hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=128, **common,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
        )
    if family == "roberta":
        return transformers.RobertaConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=130, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            vocab_size=VOCAB, pad_token_id=1,
        )
    raise ValueError(family)


def build(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A causal LM for decoders, a 2-label sequence classifier for encoders."""
    torch.manual_seed(seed)
    config = config_for(family)
    if family in ENCODERS:
        config.num_labels = 2
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def random_ids(batch: int, length: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=generator)
