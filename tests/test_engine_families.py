"""The engine on every decoder family it runs, against transformers itself.

Tiny random float32 models are built from transformers' own config classes
(Llama with each rope scaling, Qwen2 with a window, Qwen3, Mistral with a
window shorter than the prompt, Gemma, Gemma 2 with soft-capping, Gemma 3
with local and global layers, Phi-3 with fused projections, partial
rotation and LongRoPE) and saved as Hugging Face folders. The reference is
transformers' forward pass and ``generate`` on the same folder (eager
attention); with interventions, the torch path (``ReftModel``) on it.
Prompts are longer than every sliding window, and generation runs past the
lengths where dynamic and LongRoPE scaling change their frequencies.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import InterventionConfig, ReftConfig, get_reft_model  # noqa: E402

from .test_engine import strengthen  # noqa: E402
from .tiny_models import VOCAB, random_ids, tokenizer  # noqa: E402

TOLERANCE = 1e-4
PROMPT = 20  # longer than every window below
COMPONENTS = ["block_output", "block_input", "mlp_output", "attention_output"]
TYPES = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft", "red", "steer"]
LOW_RANK = {"loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"}

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)


def _config(name: str) -> transformers.PretrainedConfig:
    if name == "llama-llama3":
        return transformers.LlamaConfig(
            **COMMON,
            head_dim=16,
            max_position_embeddings=256,
            rope_theta=500.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if name == "llama-linear":
        return transformers.LlamaConfig(
            **COMMON, max_position_embeddings=128, rope_scaling={"rope_type": "linear", "factor": 3.0}
        )
    if name == "llama-dynamic":
        # The base grows once a sequence passes 16 positions.
        return transformers.LlamaConfig(
            **COMMON, max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 4.0}
        )
    if name == "llama-yarn":
        # max_position_embeddings = factor × original: transformers 4.5x and 5.x agree.
        return transformers.LlamaConfig(
            **COMMON,
            max_position_embeddings=64,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        )
    if name == "qwen2-window":
        return transformers.Qwen2Config(
            **COMMON,
            max_position_embeddings=128,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
        )
    if name == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=16, max_position_embeddings=128)
    if name == "mistral-window":
        return transformers.MistralConfig(**COMMON, max_position_embeddings=128, sliding_window=6)
    if name == "gemma":
        return transformers.GemmaConfig(**COMMON, head_dim=8, max_position_embeddings=128)
    if name == "gemma2":
        return transformers.Gemma2Config(
            **COMMON,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=6,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=3.0,
        )
    if name == "gemma3":
        return transformers.Gemma3TextConfig(
            **COMMON,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_theta=5000.0,
            rope_local_base_freq=300.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            query_pre_attn_scalar=16,
        )
    if name == "phi3":
        # Fused qkv and gate/up, half the head rotated, LongRoPE past 12 positions.
        return transformers.Phi3Config(
            **{**COMMON, "num_key_value_heads": 4},
            max_position_embeddings=48,
            original_max_position_embeddings=12,
            partial_rotary_factor=0.5,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.5],
                "long_factor": [2.0, 5.0],
            },
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
    if name == "phi3-window":
        return transformers.Phi3Config(
            **{**COMMON, "num_key_value_heads": 4},
            max_position_embeddings=64,
            sliding_window=7,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
    raise ValueError(name)


FAMILIES = [
    "llama-llama3",
    "llama-linear",
    "llama-dynamic",
    "llama-yarn",
    "qwen2-window",
    "qwen3",
    "mistral-window",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "phi3-window",
]


def _build(name: str, changes: dict | None = None) -> torch.nn.Module:
    """The tiny model ``name`` with random weights (norms included), its
    config changed by ``changes``."""
    torch.manual_seed(sum(map(ord, name)))
    original = _config(name)
    settings = original.to_dict()
    settings.update(changes or {})
    config = type(original).from_dict(settings)
    config.initializer_range = 0.2
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        # Gemma's norms start at zero (a factor of 1): random ones test the offset.
        for module_name, parameter in model.named_parameters():
            if "norm" in module_name:
                parameter.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-families")
    out = {}
    for name in FAMILIES:
        _build(name).save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
        out[name] = root / name
    return out


def _load(folders, name):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folders[name], attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None  # compare with ignore_eos=True
    return model


def _skip_old_phi3_generation(name: str) -> None:
    if name == "phi3" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(
            "transformers 4.5x generates Phi-3 past its LongRoPE length with logits its own forward pass "
            "does not give (5.x gives them); the engine follows the forward pass"
        )


def _long_ids(n=PROMPT, seed=0):
    return random_ids(1, n, seed=seed)[0]


def assert_same_greedy(got: list[int], generate, ids: torch.Tensor, new: int) -> None:
    """``got`` equals the greedy tokens of ``generate`` (transformers' or
    the torch path's) up to the first step where its two best logits are
    closer than the tolerance: there the float noise of either side may
    pick either token, and what follows is another continuation."""
    out = generate(
        ids[None],
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    want = out.sequences[0, ids.shape[0] :].tolist()
    for step, scores in enumerate(out.scores):
        top = torch.topk(scores[0], 2).values
        if float(top[0] - top[1]) < TOLERANCE:
            break
        assert got[step] == want[step], (step, got, want)
    assert step >= 8, f"a near tie at step {step}: the test needs other weights"


def test_every_family_is_in_the_model_type_list(folders):
    types = {json.loads((folders[name] / "config.json").read_text())["model_type"] for name in FAMILIES}
    assert types == {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_transformers_on_a_prompt_longer_than_the_window(folders, name):
    model = _load(folders, name)
    engine = reft_rs.Engine(folders[name])
    for n, seed in ((PROMPT, 0), (7, 1), (30, 2)):
        ids = _long_ids(n, seed)
        with torch.no_grad():
            expected = model(input_ids=ids[None]).logits[0].numpy()
        got = engine.logits(ids.tolist())
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= TOLERANCE, (name, n, np.abs(got - expected).max())


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_equals_transformers_through_the_cache(folders, name):
    """Decoding one token at a time reads the cache through the windows, and
    crosses the lengths where dynamic and LongRoPE frequencies change."""
    _skip_old_phi3_generation(name)
    model = _load(folders, name)
    engine = reft_rs.Engine(folders[name])
    for n in (5, PROMPT):
        ids = _long_ids(n, seed=n)
        expected = model.generate(ids[None], max_new_tokens=24, do_sample=False, pad_token_id=0)[
            0, n:
        ].tolist()
        got = engine.generate_ids([ids.tolist()], 24, ignore_eos=True)[0]
        assert got == expected, name


def test_the_windows_and_scalings_change_the_outputs(folders):
    """Each setting under test matters on these prompts: the same weights
    without it give other logits (so the tests above can fail)."""
    ids = _long_ids()
    changes = {
        "mistral-window": {"sliding_window": None},
        "qwen2-window": {"use_sliding_window": False},
        "gemma2": {"attn_logit_softcapping": None},
        "gemma3": {"sliding_window": 512},
        "phi3-window": {"sliding_window": None},
        "llama-llama3": {"rope_scaling": None},
        "llama-dynamic": {"rope_scaling": None},
        "llama-yarn": {"rope_scaling": None},
    }
    for name, change in changes.items():
        model = _load(folders, name)
        original = _config(name)
        settings = original.to_dict()
        settings.update(change)
        if change.get("rope_scaling", 0) is None:
            rope = getattr(original, "rope_parameters", None) or {}
            settings.update(
                rope_parameters=None, rope_theta=rope.get("rope_theta", getattr(original, "rope_theta", None))
            )
        if name == "qwen2-window":
            settings.pop("layer_types")  # derived again from use_sliding_window
        config = type(original).from_dict(settings)
        other = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            a = model(input_ids=ids[None]).logits
            b = other(input_ids=ids[None]).logits
        assert (a - b).abs().max() > 1e-3, name


# ---------------------------------------------------------------- interventions


def _intervention(kind, component, layer=1):
    return InterventionConfig(
        layer=layer,
        type=kind,
        component=component,
        low_rank_dimension=3 if kind in LOW_RANK else None,
        positions="f2+l2" if kind in LOW_RANK else "all",
    )


CASES = [(name, "loreft", c) for name in FAMILIES for c in COMPONENTS] + [
    (name, kind, "block_output") for name in ("qwen3", "gemma3", "phi3") for kind in TYPES if kind != "loreft"
]


@pytest.mark.parametrize(("name", "kind", "component"), CASES)
def test_every_intervention_matches_the_torch_path(folders, name, kind, component, tmp_path):
    config = ReftConfig([_intervention(kind, component), _intervention("red", "block_output", layer=2)])
    torch.manual_seed(0)
    reft_model = get_reft_model(_load(folders, name), config)
    strengthen(reft_model)
    reft_model.save_pretrained(tmp_path / "reft")
    ids = _long_ids()
    with torch.no_grad():
        expected = reft_model(input_ids=ids[None]).logits[0].numpy()
        plain = reft_model.model(input_ids=ids[None]).logits[0].numpy()
    engine = reft_rs.Engine(folders[name], reft=tmp_path / "reft")
    got = engine.logits(ids.tolist())
    assert np.abs(expected - plain).max() > 0.05  # the edit matters...
    assert np.abs(got - expected).max() <= TOLERANCE  # ...and the engine makes it


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_with_interventions_matches_the_torch_path(folders, name, tmp_path):
    _skip_old_phi3_generation(name)
    config = ReftConfig(
        [
            _intervention("loreft", "attention_output", layer=0),
            _intervention("loreft", "mlp_output", layer=2),
            _intervention("steer", "block_output", layer=1),
        ]
    )
    torch.manual_seed(1)  # the interventions' own initialisation, whatever ran before
    reft_model = get_reft_model(_load(folders, name), config)
    strengthen(reft_model, seed=1)
    reft_model.save_pretrained(tmp_path / "reft")
    engine = reft_rs.Engine(folders[name], reft=tmp_path / "reft")
    ids = _long_ids(9, seed=3)
    got = engine.generate_ids([ids.tolist()], 24, ignore_eos=True)[0]
    assert_same_greedy(got, reft_model.generate, ids, 24)
    for strength in (0.5, -1.0):
        with torch.no_grad():
            want = reft_model(input_ids=ids[None], strength=strength).logits[0].numpy()
        assert np.abs(engine.logits(ids.tolist(), strength=strength) - want).max() <= TOLERANCE


def test_gemma3_checkpoints_name_the_text_model_and_apply(folders, tmp_path):
    reft_model = get_reft_model(
        _load(folders, "gemma3"), ReftConfig([_intervention("loreft", "block_output")])
    )
    reft_model.save_pretrained(tmp_path / "reft")
    saved = json.loads((tmp_path / "reft" / "reft_config.json").read_text())
    assert saved["base_model"]["model_type"] == "gemma3_text"
    engine = reft_rs.Engine(folders["gemma3"], reft=tmp_path / "reft")
    assert engine.model_type == "gemma3_text"
    with pytest.raises(reft_rs.IncompatibleModelError, match="model type"):
        reft_rs.Engine(folders["qwen3"], reft=tmp_path / "reft")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, '"mrope"'),
        ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}}, "short_factor"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"layer_types": ["chunked_attention"] * 3}, "chunked_attention"),
        ({"partial_rotary_factor": 0.1}, "rotated dimensions"),
    ],
)
def test_unsupported_rotary_and_layer_settings_are_refused_by_name(folders, tmp_path, change, named):
    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((folders["qwen3"] / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.pop("rope_scaling", None)
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((folders["qwen3"] / "model.safetensors").read_bytes())
    with pytest.raises(reft_rs.ModelLoadError, match=named):
        reft_rs.Engine(folder)
