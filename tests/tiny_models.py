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


SEQ2SEQ = ("t5", "mt5", "bart")
#: Decoder depth of the tiny encoder-decoders (their encoders have LAYERS).
DECODER_LAYERS = {"t5": LAYERS, "mt5": LAYERS, "bart": LAYERS + 1}


def seq2seq_config_for(family: str) -> transformers.PretrainedConfig:
    """A tiny T5 or BART config; BART's decoder is one layer deeper than its
    encoder (T5's generate in transformers needs equal depths). Their random
    weights are widened so that what they generate depends on the input
    (with the default scales every input gives one repeated token)."""
    if family in ("t5", "mt5"):
        # mT5 (like Flan-T5) uses the gated-GELU feed-forward block.
        kind = transformers.T5Config if family == "t5" else transformers.MT5Config
        return kind(
            feed_forward_proj="relu" if family == "t5" else "gated-gelu",
            vocab_size=VOCAB,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=48,
            num_layers=LAYERS,
            num_decoder_layers=DECODER_LAYERS[family],
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
    if family in ("t5", "mt5"):
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


VISION_LANGUAGE = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3")
#: Families that read images as their sibling does.
_LAYOUT = {"qwen2_5_vl": "qwen2_vl", "smolvlm": "idefics3"}
#: The image placeholder token of the tiny vision-language models.
IMAGE_TOKEN = 90
#: Language-model tokens each image of the tiny vision-language models becomes.
IMAGE_TOKENS = {"llava": 16, "qwen2_vl": 4, "qwen2_5_vl": 4, "idefics3": 4, "smolvlm": 4, "gemma3": 4}
VISION_LAYERS = 2
VISION_WIDTH = 24


def vision_language_config_for(family: str) -> transformers.PretrainedConfig:
    """A tiny vision-language model's config: a 3-layer language model of
    width 32 and a 2-layer vision encoder of width 24 reading 16×16 images
    in 4×4 patches."""
    text = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=VISION_WIDTH,
        intermediate_size=48,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    if family == "llava":
        return transformers.LlavaConfig(
            text_config=transformers.LlamaConfig(**text),
            vision_config=transformers.CLIPVisionConfig(**vision, projection_dim=VISION_WIDTH),
            image_token_index=IMAGE_TOKEN,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
    if family == "qwen2_vl":
        return transformers.Qwen2VLConfig(
            text_config=dict(
                model_type="qwen2_vl_text",
                **text,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            ),
            vision_config=dict(
                depth=VISION_LAYERS,
                embed_dim=VISION_WIDTH,
                hidden_size=HIDDEN,
                num_heads=2,
                mlp_ratio=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
            ),
            image_token_id=IMAGE_TOKEN,
            video_token_id=91,
            vision_start_token_id=92,
            vision_end_token_id=93,
        )
    if family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLConfig(
            text_config=dict(
                model_type="qwen2_5_vl_text",
                **text,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            ),
            vision_config=dict(
                depth=VISION_LAYERS,
                hidden_size=VISION_WIDTH,
                out_hidden_size=HIDDEN,
                intermediate_size=48,
                num_heads=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
                window_size=8,
                fullatt_block_indexes=[1],
            ),
            image_token_id=IMAGE_TOKEN,
            video_token_id=91,
            vision_start_token_id=92,
            vision_end_token_id=93,
        )
    if family == "smolvlm":
        return transformers.SmolVLMConfig(
            text_config=transformers.LlamaConfig(**text),
            vision_config=transformers.SmolVLMVisionConfig(**vision),
            image_token_id=IMAGE_TOKEN,
            scale_factor=2,
        )
    if family == "idefics3":
        return transformers.Idefics3Config(
            text_config=transformers.LlamaConfig(**text),
            vision_config=transformers.Idefics3VisionConfig(**vision),
            image_token_id=IMAGE_TOKEN,
            scale_factor=2,
        )
    if family == "gemma3":
        return transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(
                **{**text, "num_key_value_heads": 1}, head_dim=8, sliding_window=8
            ),
            vision_config=transformers.SiglipVisionConfig(**vision),
            mm_tokens_per_image=IMAGE_TOKENS["gemma3"],
            image_token_index=IMAGE_TOKEN,
            boi_token_index=91,
            eoi_token_index=92,
        )
    raise ValueError(family)


def build_vision_language(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, init_range: float | None = None
) -> torch.nn.Module:
    """A tiny random vision-language model (its ``*ForConditionalGeneration``
    class); ``init_range`` widens the random weights (see :func:`build`)."""
    torch.manual_seed(seed)
    config = vision_language_config_for(family)
    if init_range is not None:
        config.initializer_range = init_range
        config.get_text_config().initializer_range = init_range
    classes = {
        "llava": transformers.LlavaForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "idefics3": transformers.Idefics3ForConditionalGeneration,
        "smolvlm": transformers.SmolVLMForConditionalGeneration,
        "gemma3": transformers.Gemma3ForConditionalGeneration,
    }
    model = classes[family](config)
    if family == "gemma3":
        # Gemma 3 starts its image projection at zero: images would change nothing.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def image_inputs(family: str, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each model takes for ``images``, ``(n, 3, 16, 16)`` pixels, one
    per example (Qwen2-VL: its flattened 2×4×4 patches and their grid)."""
    n = images.shape[0]
    family = _LAYOUT.get(family, family)
    if family == "qwen2_vl":
        # Qwen2-VL's processor order: (t, h/merge, w/merge, merge, merge) patches of
        # (channels, temporal 2, 4, 4) values; one frame repeated in time.
        frames = images.unsqueeze(1).repeat(1, 2, 1, 1, 1)  # n, t=2, c, 16, 16
        patches = frames.reshape(n, 1, 2, 3, 2, 2, 4, 2, 2, 4)  # n, grid_t, t, c, h/2m, m, p, w/2m, m, p
        patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        return {
            "pixel_values": patches.reshape(n * 16, 3 * 2 * 4 * 4),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * n),
        }
    if family == "idefics3":
        return {"pixel_values": images.unsqueeze(1)}
    return {"pixel_values": images}


def prompt_with_image(family: str, before: list[int], after: list[int]) -> list[int]:
    """Token ids of a prompt with one image between two runs of words."""
    image = [IMAGE_TOKEN] * IMAGE_TOKENS[family]
    if _LAYOUT.get(family, family) == "qwen2_vl":
        image = [92, *image, 93]  # vision start and end
    return [*before, *image, *after]


def vision_language_inputs(
    family: str, ids: torch.Tensor, images: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A batch as the family's processor gives it: ids, mask, pixels, and
    the token types Qwen2-VL (``mm_token_type_ids``) and Gemma 3
    (``token_type_ids``) read (1 on image tokens)."""
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}
    out.update(image_inputs(family, images))
    if _LAYOUT.get(family, family) == "qwen2_vl":
        out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    if family == "gemma3":
        out["token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return out


VISION_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ image }} {% else %}{{ c['text'] }} {% endif %}{% endfor %}</s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def vision_language_processor(family: str):
    """The family's own processor class over the test tokenizer (with the
    family's image token added) and a 16×16 image processor (LLaVA's: the
    others' processors need what this machine lacks, such as torchvision
    for Qwen2-VL's video processor)."""
    tok = tokenizer(chat=False)
    if family == "llava":
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        images = transformers.CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        )
        return transformers.LlavaProcessor(
            image_processor=images,
            tokenizer=tok,
            patch_size=4,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token="<image>",
            chat_template=VISION_CHAT_TEMPLATE.replace("{{ image }}", "<image>"),
        )
    raise ValueError(family)


def build_for_processor(family: str, processor, *, seed: int = 0, init_range: float | None = None):
    """A tiny LLaVA whose image token is the processor's."""
    torch.manual_seed(seed)
    config = vision_language_config_for(family)
    config.image_token_index = config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    if init_range is not None:
        config.initializer_range = init_range
        config.get_text_config().initializer_range = init_range
    return transformers.LlavaForConditionalGeneration(config).eval()
