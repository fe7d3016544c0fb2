"""The Rust CPU engine against the torch path: logits, generation, positions,
tokenizer and chat template, errors, threads, and an import without torch.

Tiny random float32 models of the three engine families are saved as
Hugging Face folders; the torch path (``ReftModel``) on the same weights and
the same checkpoint is the reference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import InterventionConfig, ReftConfig, ReftModel, get_reft_model  # noqa: E402

from .tiny_models import VOCAB, build, random_ids, tokenizer  # noqa: E402

FAMILIES = ["llama", "qwen2", "gpt2"]
TYPES = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft", "red", "steer"]
COMPONENTS = ["block_output", "block_input", "mlp_output", "attention_output"]
LOW_RANK = {"loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"}
TOLERANCE = 1e-4  # max |Δlogits| for float32 parameters; measured differences are ~1e-6

CASES = (
    [(family, kind, "block_output") for family in FAMILIES for kind in TYPES]
    + [(family, "loreft", c) for family in FAMILIES for c in COMPONENTS[1:]]
    + [("llama", kind, c) for kind in ("red", "steer", "noreft") for c in COMPONENTS[1:]]
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved model folder per family (with the test tokenizer)."""
    root = tmp_path_factory.mktemp("engine-models")
    out = {}
    for family in FAMILIES:
        model = build(family, init_range=0.2)
        model.save_pretrained(root / family)
        tokenizer().save_pretrained(root / family)
        out[family] = root / family
    return out


def load_model(folders, family):
    model = transformers.AutoModelForCausalLM.from_pretrained(folders[family]).eval()
    model.generation_config.eos_token_id = None  # compare with ignore_eos=True
    return model


def strengthen(reft_model, seed=0):
    """Random interventions strong enough to change the outputs clearly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for intervention in reft_model.interventions:
            for name in ("scale", "vector", "bias", "projection_bias"):
                value = getattr(intervention, name, None)
                if value is not None:
                    value.copy_(torch.randn(value.shape, generator=generator))
            for name in ("weight", "projection_weight"):
                value = getattr(intervention, name, None)
                if value is not None:
                    value.mul_(8)


def intervention(kind, component, layer=1, **options):
    return InterventionConfig(
        layer=layer,
        type=kind,
        component=component,
        low_rank_dimension=3 if kind in LOW_RANK else None,
        positions=options.pop("positions", "f2+l2" if kind in LOW_RANK else "all"),
        **options,
    )


def checkpoint_for(folders, family, config, path, seed=0):
    reft_model = get_reft_model(load_model(folders, family), config)
    strengthen(reft_model, seed)
    reft_model.save_pretrained(path)
    return reft_model


@pytest.mark.parametrize(("family", "kind", "component"), CASES)
def test_logits_match_the_torch_path(folders, family, kind, component, tmp_path):
    config = ReftConfig([intervention(kind, component), intervention("loreft", "block_output", layer=2)])
    reft_model = checkpoint_for(folders, family, config, tmp_path / "reft")
    ids = random_ids(1, 13)[0]
    with torch.no_grad():
        expected = reft_model(input_ids=ids[None]).logits[0].numpy()
        plain = reft_model.model(input_ids=ids[None]).logits[0].numpy()
    engine = reft_rs.Engine(folders[family], reft=tmp_path / "reft")
    got = engine.logits(ids.tolist())
    assert got.shape == (13, VOCAB) and got.dtype == np.float32
    assert np.abs(expected - plain).max() > 0.1  # the edit matters...
    assert np.abs(got - expected).max() <= TOLERANCE  # ...and the engine makes it
    bare = reft_rs.Engine(folders[family])
    assert np.abs(bare.logits(ids.tolist()) - plain).max() <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_of_64_tokens_matches_the_torch_path(folders, family, tmp_path):
    config = ReftConfig.for_layers([0, 2], low_rank_dimension=3, positions="f3+l3")
    reft_model = checkpoint_for(folders, family, config, tmp_path / "reft")
    engine = reft_rs.Engine(folders[family], reft=tmp_path / "reft")
    for n in (5, 11):
        ids = random_ids(1, n, seed=n)
        expected = reft_model.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=0)
        expected = expected[0, n:].tolist()
        got = engine.generate_ids([ids[0].tolist()], max_new_tokens=64, ignore_eos=True)[0]
        assert got == expected
        plain = reft_rs.Engine(folders[family]).generate_ids([ids[0].tolist()], 64, ignore_eos=True)[0]
        assert plain != got  # the interventions change the continuation


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batches_equal_one_by_one_and_the_torch_batch(folders, family, tmp_path):
    config = ReftConfig(
        [intervention("loreft", "block_output", positions="f2+l2"), intervention("red", "mlp_output")]
    )
    reft_model = checkpoint_for(folders, family, config, tmp_path / "reft")
    engine = reft_rs.Engine(folders[family], reft=tmp_path / "reft")
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (4, 9, 6)]
    singles = [engine.generate_ids([p], 12, ignore_eos=True)[0] for p in prompts]
    assert engine.generate_ids(prompts, 12, ignore_eos=True) == singles
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch_out = reft_model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert torch_out[:, width:].tolist() == singles


def test_intervening_on_generated_tokens_matches_the_torch_path(folders, tmp_path):
    config = ReftConfig([intervention("loreft", "block_output", positions="l2")])
    reft_model = checkpoint_for(folders, "llama", config, tmp_path / "reft")
    engine = reft_rs.Engine(folders["llama"], reft=tmp_path / "reft")
    ids = random_ids(1, 7, seed=2)
    expected = reft_model.generate(
        ids, max_new_tokens=16, do_sample=False, pad_token_id=0, intervene_on_generated=True
    )[0, 7:].tolist()
    got = engine.generate_ids([ids[0].tolist()], 16, intervene_on_generated=True, ignore_eos=True)[0]
    assert got == expected
    assert got != engine.generate_ids([ids[0].tolist()], 16, ignore_eos=True)[0]


def test_sampling_is_seeded_and_filtered(folders):
    engine = reft_rs.Engine(folders["llama"])
    prompt = [random_ids(1, 6)[0].tolist()]
    draw = lambda seed, **kw: engine.generate_ids(  # noqa: E731
        prompt, 24, temperature=1.5, seed=seed, ignore_eos=True, **kw
    )[0]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert draw(5, top_k=1) == engine.generate_ids(prompt, 24, ignore_eos=True)[0]
    assert draw(5, top_p=1e-9) == engine.generate_ids(prompt, 24, ignore_eos=True)[0]


def test_tokenizer_chat_template_and_streaming_follow_transformers(folders, tmp_path):
    hf = transformers.AutoTokenizer.from_pretrained(folders["llama"])
    config = ReftConfig([intervention("loreft", "block_output", positions="l2")])
    checkpoint_for(folders, "llama", config, tmp_path / "reft")
    engine = reft_rs.Engine(folders["llama"], reft=tmp_path / "reft")
    text = "the cat sat on the mat"
    assert engine.encode(text) == hf(text)["input_ids"]
    messages = [{"role": "user", "content": "what colour is the sky"}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.apply_chat_template(messages) == rendered
    assert engine.has_chat_template
    ids = hf(rendered, add_special_tokens=False)["input_ids"]
    new = engine.generate_ids([ids], 10)[0]  # up to the end-of-sequence token, if one comes
    assert engine.chat(messages, max_new_tokens=10) == engine.decode(new)
    pieces = list(engine.stream(text, max_new_tokens=10, ignore_eos=True))
    assert "".join(pieces) == engine.generate(text, 10, ignore_eos=True)[0]
    assert (
        list(engine.stream(text, 10, ignore_eos=True, tokens=True))
        == engine.generate_ids([engine.encode(text)], 10, ignore_eos=True)[0]
    )
    # A stop string cuts the text before it, in both forms.
    full = engine.generate(text, 10, ignore_eos=True)[0]
    word = full.split()[1]
    cut = engine.generate(text, 10, stop=[word], ignore_eos=True)[0]
    assert cut == full[: full.index(word)]
    assert "".join(engine.stream(text, 10, stop=word, ignore_eos=True)) == cut


def test_hostile_chat_templates_stop_with_a_tokenizer_error(folders, tmp_path):
    """A chat_template.jinja that loops, recurses or builds strings without
    end gives TokenizerError within the render budget; a long real
    conversation through the real template still renders as transformers
    renders it."""
    folder = tmp_path / "templated"
    shutil.copytree(folders["llama"], folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    conversation = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} the cat sat"}
        for i in range(2000)
    ]
    engine = reft_rs.Engine(folder)
    assert engine.apply_chat_template(conversation) == hf.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    hostile = {
        "loops": "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
        "grows": "{% set s = namespace(v='x') %}{% for i in range(60) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
        "multiplies": "{% for i in range(1000) %}{{ 'x' * 100000000 }}{% endfor %}",
        "recurses": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    }
    for name, template in hostile.items():
        (folder / "chat_template.jinja").write_text(template)
        engine = reft_rs.Engine(folder)
        started = time.monotonic()
        with pytest.raises(reft_rs.TokenizerError, match="chat template"):
            engine.apply_chat_template([{"role": "user", "content": "hi"}])
        assert time.monotonic() - started < 20, name


def test_generation_stops_at_end_of_sequence(folders, tmp_path):
    engine = reft_rs.Engine(folders["llama"])
    prompt = random_ids(1, 5)[0].tolist()
    free = engine.generate_ids([prompt], 30, ignore_eos=True)[0]
    eos = free[3]
    config = json.loads((folders["llama"] / "generation_config.json").read_text())
    folder = tmp_path / "model"
    folder.mkdir()
    for f in folders["llama"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config["eos_token_id"] = eos
    (folder / "generation_config.json").write_text(json.dumps(config))
    stopped = reft_rs.Engine(folder).generate_ids([prompt], 30)[0]
    assert stopped == free[: free.index(eos)]


def test_a_folder_without_a_tokenizer_still_gives_logits(folders, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((folders["gpt2"] / name).read_bytes())
    engine = reft_rs.Engine(folder)
    assert not engine.has_tokenizer
    assert engine.logits([3, 4, 5]).shape == (3, VOCAB)
    assert len(engine.generate_ids([[3, 4, 5]], 4, ignore_eos=True)[0]) == 4
    with pytest.raises(reft_rs.TokenizerError, match="tokenizer"):
        engine.generate("hello")


def test_sharded_weights_load(folders, tmp_path):
    model = load_model(folders, "llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = [5, 6, 7, 8]
    whole = reft_rs.Engine(folders["llama"]).logits(ids)
    assert np.array_equal(reft_rs.Engine(tmp_path / "sharded").logits(ids), whole)


def test_shards_named_outside_the_model_folder_are_refused(folders, tmp_path):
    """An index written by transformers, then edited to name shard files
    outside the folder: by a path, `..`, an absolute path or a link."""
    model = load_model(folders, "llama")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    index_path = folder / "model.safetensors.index.json"
    original = json.loads(index_path.read_text())
    first_tensor, first_shard = next(iter(original["weight_map"].items()))
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((folder / first_shard).read_bytes())
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "sub").mkdir()
    (folder / "sub" / first_shard).write_bytes((folder / first_shard).read_bytes())
    for shard in ["../outside.safetensors", str(outside), "sub/" + first_shard, "link.safetensors", 7]:
        index = json.loads(json.dumps(original))
        index["weight_map"][first_tensor] = shard
        index_path.write_text(json.dumps(index))
        with pytest.raises(reft_rs.ModelLoadError, match="not a file in the model folder|not a file name"):
            reft_rs.Engine(folder)
    index_path.write_text(json.dumps(original))
    assert reft_rs.Engine(folder).logits([5, 6]).shape[0] == 2


def test_hostile_config_values_are_refused_before_anything_is_allocated(folders, tmp_path):
    """A saved model whose config.json (or generation_config.json) was
    edited to sizes no model has, or to values that are not numbers: each
    gives ModelLoadError naming the field, at once (a context of 10^9
    positions would otherwise build gigabytes of rotary tables)."""
    folder = tmp_path / "edited"
    shutil.copytree(folders["llama"], folder)
    config_path = folder / "config.json"
    original = json.loads(config_path.read_text())
    for change, named in [
        ({"max_position_embeddings": 10**9}, "context length"),
        ({"num_hidden_layers": 10**6}, "layer count"),
        ({"hidden_size": 2**40}, "hidden size"),
        ({"vocab_size": -5}, "vocab_size is -5"),
        ({"head_dim": 4097}, "head size"),
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"rms_norm_eps": -1e-6}, "epsilon"),
        ({"eos_token_id": 2**40}, "eos_token_id"),
    ]:
        # NaN is not JSON, but Python's json writes it and serde refuses it.
        config_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(
            reft_rs.ModelLoadError, match=named if "nan" not in str(change) else "JSON|rope_theta"
        ):
            reft_rs.Engine(folder)
    config_path.write_text(json.dumps(original))
    generation = folder / "generation_config.json"
    generation.write_text(json.dumps({"eos_token_id": [2, -1]}))
    with pytest.raises(reft_rs.ModelLoadError, match="generation_config.json.*eos_token_id|eos_token_id.*-1"):
        reft_rs.Engine(folder)
    generation.unlink()
    assert reft_rs.Engine(folder).logits([5, 6]).shape[0] == 2


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_give_the_torch_paths_logits(folders, tmp_path, family, dtype):
    """float16 / bfloat16 folders run on the 2-byte kernels (GPT-2's Conv1D
    stored transposed): the logits of the float32 model with those weights."""
    model = load_model(folders, family).to(dtype)
    model.save_pretrained(tmp_path / "half")
    ids = [5, 6, 7, 8, 9]
    with torch.no_grad():
        expected = model.float()(input_ids=torch.tensor([ids])).logits[0].numpy()
    # 1e-3: the torch reference itself keeps its rotary frequencies rounded to bfloat16
    assert np.abs(reft_rs.Engine(tmp_path / "half").logits(ids) - expected).max() <= 1e-3


def test_errors_are_clear(folders, tmp_path):
    with pytest.raises(reft_rs.ModelNotFoundError):
        reft_rs.Engine(tmp_path / "nowhere")
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(bert)
    with pytest.raises(reft_rs.UnsupportedModelError, match="'bert'|\"bert\""):
        reft_rs.Engine(bert)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\x80\x04not a model")
    with pytest.raises(reft_rs.ModelLoadError, match="GGUF"):
        reft_rs.Engine(not_gguf)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((folders["llama"] / "config.json").read_bytes())
    data = (folders["llama"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(reft_rs.ModelLoadError):
        reft_rs.Engine(broken)
    engine = reft_rs.Engine(folders["llama"])
    with pytest.raises(reft_rs.InvalidArgumentError, match="outside the vocabulary"):
        engine.logits([1, VOCAB + 5])
    with pytest.raises(reft_rs.InvalidArgumentError, match="temperature"):
        engine.generate_ids([[1, 2]], 4, temperature=-1)
    with pytest.raises(reft_rs.InvalidArgumentError, match="top_p"):
        engine.generate_ids([[1, 2]], 4, temperature=1, top_p=2.0)
    with pytest.raises(reft_rs.InvalidArgumentError, match="no tokens"):
        engine.generate_ids([[1, 2], []], 4)
    with pytest.raises(reft_rs.InvalidArgumentError, match="positions"):
        engine.logits([1] * 200)  # the tiny models have 128 positions
    with pytest.raises(reft_rs.InvalidArgumentError):
        engine.logits([-1, 2])


def test_checkpoints_for_another_model_are_refused(folders, tmp_path):
    config = ReftConfig.for_layers([0], low_rank_dimension=2, positions="l1")
    checkpoint_for(folders, "llama", config, tmp_path / "llama-reft")
    with pytest.raises(reft_rs.IncompatibleModelError, match="model type"):
        reft_rs.Engine(folders["qwen2"], reft=tmp_path / "llama-reft")
    deeper = tmp_path / "deeper"
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(deeper)
    with pytest.raises(reft_rs.IncompatibleModelError, match="3 layers vs the model's 4"):
        reft_rs.Engine(deeper, reft=tmp_path / "llama-reft")
    with pytest.raises(reft_rs.CheckpointNotFoundError):
        reft_rs.Engine(folders["llama"], reft=tmp_path / "missing")
    custom = ReftConfig(
        [InterventionConfig(layer=0, type="red", module_path="model.layers.{layer}.mlp.down_proj")]
    )
    checkpoint_for(folders, "llama", custom, tmp_path / "custom")
    with pytest.raises(reft_rs.IncompatibleModelError, match="module_path"):
        reft_rs.Engine(folders["llama"], reft=tmp_path / "custom")


def test_checkpoints_reload_in_the_torch_path_and_the_engine_alike(folders, tmp_path):
    config = ReftConfig.for_layers([1], low_rank_dimension=3, positions="f1+l1", share_weights=True)
    checkpoint_for(folders, "gpt2", config, tmp_path / "reft")
    reloaded = ReftModel.from_pretrained(load_model(folders, "gpt2"), tmp_path / "reft")
    ids = random_ids(1, 8)[0]
    with torch.no_grad():
        expected = reloaded(input_ids=ids[None]).logits[0].numpy()
    engine = reft_rs.Engine(folders["gpt2"], reft=tmp_path / "reft", threads=1)
    assert np.abs(engine.logits(ids.tolist()) - expected).max() <= TOLERANCE
    assert engine.reft_config["interventions"][0]["share_weights"] is True


def test_one_engine_serves_several_threads(folders, tmp_path):
    config = ReftConfig.for_layers([0, 1], low_rank_dimension=2, positions="f1+l1")
    checkpoint_for(folders, "llama", config, tmp_path / "reft")
    engine = reft_rs.Engine(folders["llama"], reft=tmp_path / "reft", threads=2)
    prompts = [random_ids(1, 4 + i, seed=i)[0].tolist() for i in range(8)]
    expected = [engine.generate_ids([p], 20, ignore_eos=True)[0] for p in prompts]
    results = [None] * len(prompts)

    def work(i):
        results[i] = engine.generate_ids([prompts[i]], 20, ignore_eos=True)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_the_engine_imports_and_runs_without_torch(folders):
    code = f"""
import sys
sys.modules["torch"] = None          # any `import torch` now fails
sys.modules["transformers"] = None
import reft_rs
engine = reft_rs.Engine({str(folders["gpt2"])!r})
print(engine.logits([1, 2, 3]).shape, engine.generate("the cat", 3, ignore_eos=True) != [""])
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"(3, {VOCAB}) True"


def test_the_interpreter_runs_while_the_engine_computes(folders):
    engine = reft_rs.Engine(folders["llama"], threads=1)
    # 64 prompts of 40 tokens and 80 new ones each: long enough (tens of
    # milliseconds even on a fast core) for the main thread to tick inside.
    prompts = [random_ids(1, 40, seed=i)[0].tolist() for i in range(64)]
    window = {}

    def work():
        window["start"] = time.perf_counter()
        engine.generate_ids(prompts, 80, ignore_eos=True)
        window["end"] = time.perf_counter()

    worker = threading.Thread(target=work)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    inside = [t for t in ticks if window["start"] < t < window["end"]]
    span = window["end"] - window["start"]
    assert span > 0.02
    assert len(inside) > 100  # the main thread kept running Python meanwhile
    # ...throughout the call, not only at its edges: no pause longer than a
    # fifth of the call (with the lock held, the main thread would wait it all).
    gaps = [b - a for a, b in zip([window["start"], *inside], [*inside, window["end"]])]
    assert max(gaps) < span / 5


# ---------------------------------------------------------------- every option, both paths

SOURCE = ["loreft", "noreft", "direft", "nodireft"]
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"]
# Half-precision parameters are widened to float32 in both paths and float64
# ones computed in float64, so every dtype agrees as closely as float32 does
# (measured: at most 4e-6), well inside one rounding of the parameter dtype.


def both_paths_agree(folders, family, config, path, *, on_generated=False, seed=0):
    """Saves strengthened interventions, then checks the engine against the
    torch path: prompt logits within TOLERANCE and 12 greedy tokens
    identical (with ``intervene_on_generated`` as given)."""
    reft_model = checkpoint_for(folders, family, config, path, seed=seed)
    engine = reft_rs.Engine(folders[family], reft=path)
    ids = random_ids(1, 11, seed=seed + 1)
    with torch.no_grad():
        expected = reft_model.eval()(input_ids=ids).logits[0].numpy()
        plain = reft_model.model(input_ids=ids).logits[0].numpy()
    got = engine.logits(ids[0].tolist())
    assert np.abs(expected - plain).max() > 0.05  # the interventions matter
    assert np.abs(got - expected).max() <= TOLERANCE
    # generation runs with dropout off even in training mode
    reft_model.train()
    torch_tokens = reft_model.generate(
        ids, max_new_tokens=12, do_sample=False, pad_token_id=0, intervene_on_generated=on_generated
    )[0, 11:].tolist()
    engine_tokens = engine.generate_ids(
        [ids[0].tolist()], 12, intervene_on_generated=on_generated, ignore_eos=True
    )[0]
    assert engine_tokens == torch_tokens
    return reft_model, engine


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_matches_the_torch_path(folders, family, activation, tmp_path):
    config = ReftConfig(
        [
            intervention(kind, component, layer=layer, activation=activation)
            for kind, (layer, component) in zip(
                SOURCE, [(0, "block_output"), (1, "mlp_output"), (2, "attention_output"), (1, "block_input")]
            )
        ]
    )
    both_paths_agree(folders, family, config, tmp_path / "reft")


@pytest.mark.parametrize("family", FAMILIES)
def test_interventions_without_bias_match_the_torch_path(folders, family, tmp_path):
    config = ReftConfig(
        [
            intervention(kind, "block_output", layer=i % 3, bias=False, activation="silu")
            for i, kind in enumerate(SOURCE)
        ]
    )
    reft_model, _ = both_paths_agree(folders, family, config, tmp_path / "reft")
    assert all(i.bias is None for i in reft_model.interventions)
    saved, _ = reft_rs.io.checkpoint.load(tmp_path / "reft")
    assert not any(key.endswith(".bias") for key, _, _ in reft_rs.io.checkpoint.expected_tensors(saved))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_parameter_dtypes_match_the_torch_path(folders, family, dtype, tmp_path):
    config = ReftConfig(
        [intervention(kind, "block_output", layer=i % 3, dtype=dtype) for i, kind in enumerate(TYPES)]
    )
    both_paths_agree(folders, family, config, tmp_path / "reft")
    saved, tensors = reft_rs.io.checkpoint.load(tmp_path / "reft", framework="torch")
    assert {str(t.dtype) for t in tensors.values()} == {f"torch.{dtype}"}


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_checkpoints_are_exact_at_inference(folders, family, tmp_path):
    config = ReftConfig(
        [
            intervention(kind, "block_output", layer=i % 3, dropout=0.4)
            for i, kind in enumerate(["loreft", "red", "nodireft", "steer"])
        ]
    )
    both_paths_agree(folders, family, config, tmp_path / "reft")


@pytest.mark.parametrize("family", FAMILIES)
def test_several_interventions_on_one_site_apply_in_order(folders, family, tmp_path):
    # overlapping positions on one layer and component: the order matters
    items = [
        intervention("red", "block_output"),
        intervention("loreft", "block_output", positions="l3"),
        intervention("steer", "block_output"),
        intervention("consreft", "block_output", positions="f2+l2", share_weights=True),
        intervention("nodireft", "block_output", positions="l2", activation="tanh"),
    ]
    reft_model, engine = both_paths_agree(folders, family, ReftConfig(items), tmp_path / "reft")
    # the same checkpoint with its order reversed gives other logits, in both paths
    saved, tensors = reft_rs.io.checkpoint.load(tmp_path / "reft")
    saved["interventions"] = saved["interventions"][::-1]
    reft_rs.io.checkpoint.save(tmp_path / "reversed", saved, tensors)
    ids = random_ids(1, 11, seed=1)[0].tolist()
    reversed_engine = reft_rs.Engine(folders[family], reft=tmp_path / "reversed")
    reversed_torch = ReftModel.from_pretrained(load_model(folders, family), tmp_path / "reversed")
    with torch.no_grad():
        torch_reversed = reversed_torch(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(reversed_engine.logits(ids) - torch_reversed).max() <= TOLERANCE
    assert np.abs(reversed_engine.logits(ids) - engine.logits(ids)).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_intervening_on_generated_tokens_with_every_type(folders, family, tmp_path):
    items = [
        intervention(kind, "block_output", layer=i % 3, positions="l2")
        for i, kind in enumerate(TYPES)
        if kind in LOW_RANK
    ]
    items += [intervention("red", "mlp_output", layer=2), intervention("steer", "attention_output", layer=0)]
    both_paths_agree(folders, family, ReftConfig(items), tmp_path / "reft", on_generated=True)
