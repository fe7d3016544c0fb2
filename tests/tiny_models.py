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
            hidden_size=HIDDEN,
            intermediate_size=48,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=HIDDEN,
            intermediate_size=48,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    if family == "gemma":
        return transformers.GemmaConfig(
            hidden_size=HIDDEN,
            intermediate_size=48,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=128,
            **common,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **common,
        )
    if family == "roberta":
        return transformers.RobertaConfig(
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=130,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            vocab_size=VOCAB,
            pad_token_id=1,
        )
    raise ValueError(family)


def build(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, init_range: float | None = None
) -> torch.nn.Module:
    """A causal LM for decoders, a 2-label sequence classifier for encoders.

    ``init_range`` widens the random weights: with the default 0.02 a model
    this small cannot make confident predictions at all, whatever it learns.
    """
    torch.manual_seed(seed)
    config = config_for(family)
    if init_range is not None:
        config.initializer_range = init_range
    if family in ENCODERS:
        config.num_labels = 2
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def random_ids(batch: int, length: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=generator)


WORDS = (
    "the a cat dog sat on mat ran to park is big small red blue green yes no hello world what colour "
    "answer question please say sky sea grass tree one two three four five six seven eight nine ten"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tokenizer(*, chat: bool = True):
    """A word-level fast tokenizer over a small vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>", "<system>"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


SEQ2SEQ = ("t5", "bart")
#: Decoder depth of the tiny encoder-decoders (their encoders have LAYERS).
DECODER_LAYERS = {"t5": LAYERS, "bart": LAYERS + 1}


def seq2seq_config_for(family: str) -> transformers.PretrainedConfig:
    """A tiny T5 or BART config; BART's decoder is one layer deeper than its
    encoder (T5's generate in transformers needs equal depths). Their random
    weights are widened so that what they generate depends on the input
    (with the default scales every input gives one repeated token)."""
    if family == "t5":
        return transformers.T5Config(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=48,
            num_layers=LAYERS,
            num_decoder_layers=DECODER_LAYERS["t5"],
            num_heads=4,
            dropout_rate=0.0,
            initializer_factor=20.0,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
    if family == "bart":
        return transformers.BartConfig(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            encoder_layers=LAYERS,
            decoder_layers=DECODER_LAYERS["bart"],
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=128,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            init_std=0.2,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            decoder_start_token_id=3,
            forced_eos_token_id=None,
        )
    raise ValueError(family)


def build_seq2seq(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random encoder-decoder (``AutoModelForSeq2SeqLM``)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForSeq2SeqLM.from_config(seq2seq_config_for(family))
    return model.to(dtype).eval()


def seq2seq_tokenizer(family: str):
    """The test tokenizer with the special tokens an encoder-decoder's adds
    to every text: T5's ``text </s>``, BART's ``<s> text </s>``."""
    from tokenizers import processors

    fast = tokenizer(chat=False)
    backend = fast.backend_tokenizer
    eos, bos = fast.convert_tokens_to_ids("</s>"), fast.convert_tokens_to_ids("<s>")
    if family == "t5":
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", eos)]
        )
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
