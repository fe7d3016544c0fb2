"""Importing pyreft checkpoints and RED delta vectors."""

from __future__ import annotations

import collections
import json
import pathlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import safetensors.torch  # noqa: E402

import reft_rs  # noqa: E402
from reft_rs import InvalidCheckpointError, ReftModel  # noqa: E402
from reft_rs.io.convert import from_pyreft, from_red  # noqa: E402

from . import reference  # noqa: E402
from .tiny_models import HIDDEN, LAYERS, build, random_ids  # noqa: E402

RANK = 3
CLASSES = {
    "loreft": "LoreftIntervention",
    "noreft": "NoreftIntervention",
    "direft": "DireftIntervention",
    "nodireft": "NodireftIntervention",
    "consreft": "ConsreftIntervention",
    "lobireft": "LobireftIntervention",
}


def parametrized_rotation(seed):
    """torch's orthogonal parametrization of a [d, r] weight, trained a little."""
    torch.manual_seed(seed)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.empty(HIDDEN, RANK))
    torch.nn.init.orthogonal_(holder.weight)
    torch.nn.utils.parametrizations.orthogonal(holder)
    with torch.no_grad():
        # Training moves the reflectors (strictly lower part); the diagonal only
        # holds signs, and its gradient is zero.
        holder.parametrizations.weight.original.add_(0.3 * torch.randn(HIDDEN, RANK).tril(-1))
    weight = holder.weight.detach()
    assert (weight.T @ weight - torch.eye(RANK)).abs().max() < 1e-5
    return holder


def pyreft_state(kind, seed, *, half_precision_source=False):
    """What pyreft 0.1.0 saves for one intervention (SPEC section 4)."""
    torch.manual_seed(seed)
    source_dtype = torch.bfloat16 if half_precision_source else torch.float32
    linear = {
        "weight": torch.randn(RANK, HIDDEN).to(source_dtype),
        "bias": torch.randn(RANK).to(source_dtype),
    }
    holder = parametrized_rotation(seed)
    rotation_state = {f"rotate_layer.{k}": v.clone() for k, v in holder.state_dict().items()}
    if kind == "loreft":
        return {**linear, "rotate_layer": holder.weight.detach().clone()}, holder
    if kind == "direft":
        return {**{f"learned_source.{k}": v for k, v in linear.items()}, **rotation_state}, holder
    if kind in ("consreft", "lobireft"):
        return {"learned_source": torch.rand(RANK), **rotation_state}, holder
    projection = {"proj_layer.weight": torch.randn(RANK, HIDDEN), "proj_layer.bias": torch.randn(RANK)}
    return {**{f"learned_source.{k}": v for k, v in linear.items()}, **projection}, None


def pyreft_edit(kind, state, holder, h):
    """pyreft's forward formulas, from its saved tensors."""
    h = h.float()
    if kind in ("loreft",):
        W = state["rotate_layer"].float()
        source = h @ state["weight"].float().T + state["bias"].float()
        return h + (source - h @ W) @ W.T
    if kind == "direft":
        W = holder.weight.detach()
        source = h @ state["learned_source.weight"].float().T + state["learned_source.bias"].float()
        return h + source @ W.T
    if kind == "consreft":
        W = holder.weight.detach()
        return h + (state["learned_source"] - h @ W) @ W.T
    if kind == "lobireft":
        return h + state["learned_source"] @ holder.weight.detach().T
    source = h @ state["learned_source.weight"].float().T + state["learned_source.bias"].float()
    projection = state["proj_layer.weight"]
    if kind == "noreft":
        return h + (source - (h @ projection.T + state["proj_layer.bias"])) @ projection
    return h + source @ projection


def pyvene_key(layer, component, counters, key_style):
    """pyvene's ``_get_representation_key``: 0.1.7 on (``underscore``) or up
    to 0.1.6 (``dotted``); repeats of a placement are numbered #0, #1, ...
    in the order of ``representations``."""
    if key_style == "underscore":
        proposal = f"layer_{layer}_comp_{component}_unit_pos_nunit_1"
    else:
        proposal = f"layer.{layer}.comp.{component}.unit.pos.nunit.1"
    counters[proposal] = counters.get(proposal, -1) + 1
    return f"{proposal}#{counters[proposal]}"


def write_pyreft(folder, interventions, *, key_style="underscore", seed=0):
    """A pyreft checkpoint folder as pyreft 0.1.0 (pyvene) saves one:
    ``config.json`` with positional ``representations`` in the order given,
    one ``intkey_<key>.bin`` per intervention, ``sorted_keys`` in that order.
    ``interventions``: ``(kind, layer)`` pairs; each gets its own weights."""
    folder.mkdir(parents=True, exist_ok=True)
    representations, types, keys, states = [], [], [], []
    counters = {}
    for index, (kind, layer) in enumerate(interventions):
        key = pyvene_key(layer, "block_output", counters, key_style)
        state, holder = pyreft_state(kind, seed=seed + index, half_precision_source=kind == "loreft")
        torch.save(state, folder / f"intkey_{key}.bin")
        representations.append(
            [layer, "block_output", "pos", 1, RANK, None, None, None, None, None, None, None, None, None]
        )
        types.append(f"<class 'pyreft.interventions.{CLASSES[kind]}'>")
        keys.append(key)
        states.append((state, holder))
    config = {
        "intervention_constant_sources": [True] * len(keys),
        "intervention_dimensions": [HIDDEN] * len(keys),
        "intervention_types": types,
        "mode": "parallel",
        "model_type": "<class 'transformers.models.llama.modeling_llama.LlamaForCausalLM'>",
        "representations": representations,
        "sorted_keys": keys,
        "transformers_version": "4.45.1",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return states


def pyreft_logits(model, interventions, states, ids, spec, share_weights):
    """pyreft's result, written plainly: each intervention edits its layer's
    output at the locations pyreft's get_intervention_locations rule gives
    it (the i-th list for the i-th representation)."""
    first, last = reference.parse_first_last(spec)
    locations = reference.pyreft_locations(
        ids.shape[1], first, last, share_weights=share_weights, num_interventions=len(interventions)
    )
    handles = []
    for (kind, layer), (state, holder), positions in zip(interventions, states, locations):
        assert reference.MASKED not in positions  # prompts long enough: pyreft pads onto real tokens

        def hook(module, args, output, state=state, holder=holder, kind=kind, positions=positions):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            for position in positions:
                hidden[:, position] = pyreft_edit(kind, state, holder, hidden[:, position]).to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("key_style", ["underscore", "dotted"])
def test_each_pyreft_type_converts_to_the_same_function(kind, key_style, tmp_path):
    [(state, holder)] = write_pyreft(tmp_path / "pyreft", [(kind, 1)], key_style=key_style)
    model = build("llama")
    config = from_pyreft(tmp_path / "pyreft", tmp_path / "ours", base_model=model, positions="l2")
    assert config.interventions[0].type == kind
    reft_model = ReftModel.from_pretrained(build("llama"), tmp_path / "ours")
    states = torch.randn(5, HIDDEN)
    with torch.no_grad():
        got = reft_model.interventions[0](states)
    torch.testing.assert_close(got, pyreft_edit(kind, state, holder, states), rtol=1e-5, atol=1e-5)
    if kind == "loreft":
        # pyreft keeps W and b in bfloat16 beside a float32 R; reft_rs widens exactly
        assert reft_model.interventions[0].weight.dtype == torch.float32
        assert torch.equal(reft_model.interventions[0].weight, state["weight"].float())


ORDERS = {
    # pyreft's scripts: layers + layers (prefix interventions of every layer, then suffix ones)
    "layers+layers": [
        ("loreft", 0),
        ("direft", 1),
        ("noreft", 2),
        ("consreft", 0),
        ("nodireft", 1),
        ("lobireft", 2),
    ],
    # any order a user built: the first half still reads the first positions
    "scrambled": [
        ("loreft", 2),
        ("direft", 0),
        ("noreft", 1),
        ("consreft", 1),
        ("nodireft", 2),
        ("lobireft", 0),
    ],
    # both interventions of a layer side by side: layer 0 twice in the prefix half
    "paired": [
        ("loreft", 0),
        ("direft", 0),
        ("noreft", 2),
        ("consreft", 2),
        ("nodireft", 1),
        ("lobireft", 1),
    ],
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyreft-llama")
    build("llama", init_range=0.2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("key_style", ["underscore", "dotted"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_a_converted_model_gives_pyreft_outputs(order, key_style, llama_folder, tmp_path):
    interventions = ORDERS[order]
    states = write_pyreft(tmp_path / "pyreft", interventions, key_style=key_style)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    config = from_pyreft(tmp_path / "pyreft", tmp_path / "ours", base_model=model, positions="f2+l2")
    # pyreft's rule: halves of the representations list, whatever the layers
    assert [(i.layer, i.type, i.group) for i in config.interventions] == [
        (layer, kind, 0 if index < 3 else 1) for index, (kind, layer) in enumerate(interventions)
    ]
    saved, _ = reft_rs.io.checkpoint.load(tmp_path / "ours")
    recorded = saved["metadata"]["pyreft_keys"]
    counters = {}
    assert [entry["key"] for entry in recorded] == [
        pyvene_key(layer, "block_output", counters, key_style) for _, layer in interventions
    ]
    assert [entry["group"] for entry in recorded] == [0, 0, 0, 1, 1, 1]
    assert [entry["intervention"] for entry in recorded] == [i.name for i in config.interventions]
    reft_model = ReftModel.from_pretrained(model, tmp_path / "ours")
    engine = reft_rs.Engine(llama_folder, reft=tmp_path / "ours")
    for length in (4, 9):
        ids = random_ids(1, length, seed=length)
        expected = pyreft_logits(model, interventions, states, ids, "f2+l2", share_weights=False)
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            got = reft_model(input_ids=ids).logits
        assert (expected - plain).abs().max() > 0.05  # the edits matter
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(engine.logits(ids[0].tolist()), expected[0].numpy(), rtol=0, atol=1e-5)


def test_shared_pyreft_weights_edit_both_ends(llama_folder, tmp_path):
    interventions = [("loreft", 2), ("direft", 0), ("lobireft", 1)]
    states = write_pyreft(tmp_path / "pyreft", interventions)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    config = from_pyreft(tmp_path / "pyreft", tmp_path / "ours", base_model=model, positions="f1+l2")
    assert all(i.share_weights and i.group == 0 for i in config.interventions)  # inferred: no repeats
    reft_model = ReftModel.from_pretrained(model, tmp_path / "ours")
    ids = random_ids(1, 8, seed=3)
    expected = pyreft_logits(model, interventions, states, ids, "f1+l2", share_weights=True)
    with torch.no_grad():
        torch.testing.assert_close(reft_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_representations_not_sorted_keys_give_the_order(tmp_path):
    interventions = [("loreft", 0), ("direft", 1), ("noreft", 0), ("consreft", 1)]
    write_pyreft(tmp_path / "pyreft", interventions)
    config = json.loads((tmp_path / "pyreft" / "config.json").read_text())
    config["sorted_keys"] = sorted(config["sorted_keys"])  # a custom sort order at training time
    (tmp_path / "pyreft" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="sorted_keys list the interventions in another order"):
        converted = from_pyreft(
            tmp_path / "pyreft", tmp_path / "ours", base_model=build("llama"), positions="f1+l1"
        )
    assert [(i.type, i.layer, i.group) for i in converted.interventions] == [
        ("loreft", 0, 0), ("direft", 1, 0), ("noreft", 0, 1), ("consreft", 1, 1)
    ]  # fmt: skip


def test_an_odd_count_cannot_be_split_into_halves(tmp_path):
    write_pyreft(tmp_path / "pyreft", [("loreft", 0), ("loreft", 0), ("loreft", 1)])
    with pytest.raises(InvalidCheckpointError, match="3 interventions cannot be split"):
        from_pyreft(tmp_path / "pyreft", tmp_path / "ours", base_model=build("llama"), positions="f1+l1")
    assert not (tmp_path / "ours").exists()
    # shared weights, or a one-sided spec, have no halves to split
    from_pyreft(
        tmp_path / "pyreft",
        tmp_path / "ours",
        base_model=build("llama"),
        positions="f1+l1",
        share_weights=True,
    )
    from_pyreft(tmp_path / "pyreft", tmp_path / "one", base_model=build("llama"), positions="l2")


FIXTURE = pathlib.Path(__file__).parent / "data" / "pyreft"


@pytest.mark.parametrize(("name", "positions"), [("unshared", "f2+l2"), ("shared", "f1+l2")])
def test_folders_written_by_pyreft_itself_give_its_logits(name, positions, tmp_path):
    """tests/data/pyreft was written by pyreft 0.1.0 (make_fixture.py there),
    with its own logits at its own locations."""
    expected = safetensors.torch.load_file(FIXTURE / "expected.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE / "model").eval()
    config = from_pyreft(FIXTURE / name, tmp_path / "ours", base_model=model, positions=positions)
    if name == "unshared":  # layers 2, 0, 3 | 3, 0, 2 in pyreft's list
        assert [(i.layer, i.group) for i in config.interventions] == [
            (2, 0),
            (0, 0),
            (3, 0),
            (3, 1),
            (0, 1),
            (2, 1),
        ]
        assert [i.type for i in config.interventions] == [
            "loreft", "direft", "noreft", "consreft", "nodireft", "lobireft"
        ]  # fmt: skip
    reft_model = ReftModel.from_pretrained(model, tmp_path / "ours")
    engine = reft_rs.Engine(FIXTURE / "model", reft=tmp_path / "ours")
    for prompt in ("short", "long"):
        ids = expected[f"{prompt}.input_ids"]
        reference_logits = expected[f"{name}.{prompt}.logits"]
        assert (reference_logits - expected[f"base.{prompt}.logits"]).abs().max() > 0.1
        with torch.no_grad():
            got = reft_model(input_ids=ids).logits[0]
        torch.testing.assert_close(got, reference_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            engine.logits(ids[0].tolist()), reference_logits.numpy(), rtol=0, atol=1e-5
        )
        # and reft_rs's locations are pyreft's
        ours = reft_rs.positions.locate([ids.shape[1]], positions, share_weights=name == "shared")
        theirs = expected[f"{name}.{prompt}.locations"].numpy()
        assert [ours[i.group, 0].tolist() for i in config.interventions] == theirs.tolist()


def test_reft_rs_convert_pyreft_on_pyreft_files(tmp_path, capsys):
    from reft_rs.cli import main

    expected = safetensors.torch.load_file(FIXTURE / "expected.safetensors")
    status = main(
        ["convert", "pyreft", str(FIXTURE / "unshared"), str(tmp_path / "ours"), "--model", str(FIXTURE / "model"),
         "--positions", "f2+l2"]
    )  # fmt: skip
    assert status == 0
    assert "converted 6 interventions" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE / "model").eval()
    reft_model = ReftModel.from_pretrained(model, tmp_path / "ours")
    with torch.no_grad():
        got = reft_model(input_ids=expected["long.input_ids"]).logits[0]
    torch.testing.assert_close(got, expected["unshared.long.logits"], rtol=1e-5, atol=1e-5)
    assert main(["convert", "pyreft", str(FIXTURE / "unshared"), str(tmp_path / "odd"), "--model",
                 str(FIXTURE / "model"), "--positions", "f2+l2", "--exclude-last"]) == 0  # fmt: skip
    config, _ = reft_rs.io.checkpoint.load(tmp_path / "odd")
    assert all(entry["include_last"] is False for entry in config["interventions"])


def test_pyreft_conversion_without_the_base_model(tmp_path):
    [(state, holder)] = write_pyreft(tmp_path / "p", [("direft", 1)])
    with pytest.warns(UserWarning, match="does not record the base model"):
        from_pyreft(tmp_path / "p", tmp_path / "out", positions="f1+l1", share_weights=True)
    config, _ = reft_rs.io.checkpoint.load(tmp_path / "out")
    assert config["base_model"] == {
        "name_or_path": "",
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
    }
    reft_model = ReftModel.from_pretrained(build("llama"), tmp_path / "out")  # 3 layers: enough
    states = torch.randn(4, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(
            reft_model.interventions[0](states),
            pyreft_edit("direft", state, holder, states),
            rtol=1e-5,
            atol=1e-5,
        )
    reft_model.save_pretrained(tmp_path / "again")  # now with the real identity
    assert reft_rs.io.checkpoint.load(tmp_path / "again")[0]["base_model"]["num_hidden_layers"] == LAYERS
    narrow = {"hidden_size": HIDDEN, "num_hidden_layers": 1}
    with pytest.raises(InvalidCheckpointError, match="layer 1 does not exist"):
        from_pyreft(tmp_path / "p", tmp_path / "bad", base_model=narrow, positions="l1")


def test_pyreft_conversion_errors(tmp_path):
    with pytest.raises(reft_rs.CheckpointNotFoundError):
        from_pyreft(tmp_path / "nowhere", tmp_path / "out", base_model=build("llama"), positions="l1")
    write_pyreft(tmp_path / "p", [("loreft", 0)])
    with pytest.warns(UserWarning, match="do not record positions"):
        from_pyreft(
            tmp_path / "p", tmp_path / "out", base_model={"hidden_size": HIDDEN, "num_hidden_layers": LAYERS}
        )
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config["intervention_types"] = ["<class 'pyvene.models.interventions.VanillaIntervention'>"]
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidCheckpointError, match="VanillaIntervention"):
        from_pyreft(tmp_path / "p", tmp_path / "out", base_model=build("llama"), positions="l1")
    for change, needle in [
        ({"representations": [], "intervention_types": []}, "representations list is empty"),
        ({"representations": [["0", "block_output", "pos", 1]]}, "layer must be a non-negative integer"),
        ({"representations": [[0, "block_output", "pos", "1"]]}, "max_number_of_units must be an integer"),
        ({"representations": [[0, "mlp_input", "pos", 1]]}, "component 'mlp_input'"),
        ({"representations": [[0, "block_output", "h.pos", 1]]}, "unit 'h.pos'"),
        ({"representations": [[0, "block_output", "pos", 1, 7]]}, "records rank 7"),
        ({"representations": [[0, "../../outside", "pos", 1]]}, "component"),
        ({"intervention_types": []}, "1 representations but 0 intervention_types"),
    ]:
        write_pyreft(tmp_path / "bad", [("loreft", 0)])
        config = json.loads((tmp_path / "bad" / "config.json").read_text())
        config.update(change)
        (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
        with pytest.raises(InvalidCheckpointError, match=re.escape(needle)):
            from_pyreft(tmp_path / "bad", tmp_path / "never", base_model=build("llama"), positions="l1")
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    with pytest.raises(InvalidCheckpointError, match="not a JSON object"):
        from_pyreft(tmp_path / "bad", tmp_path / "never", base_model=build("llama"), positions="l1")
    assert not (tmp_path / "never").exists()
    write_pyreft(tmp_path / "q", [("loreft", 0)])
    [binary] = list((tmp_path / "q").glob("intkey_*.bin"))
    torch.save({"weight": collections.OrderedDict(a=collections.Counter("abc"))}, binary)
    with pytest.raises(InvalidCheckpointError):
        from_pyreft(tmp_path / "q", tmp_path / "out", base_model=build("llama"), positions="l1")


def red_state(dtype=torch.float32, layers=(0, 2)):
    generator = torch.Generator().manual_seed(7)
    state = {}
    for layer in layers:
        prefix = f"model.layers.{layer}.mlp.down_proj.delta_vector"
        state[f"{prefix}.activation_scaling"] = (1 + 0.5 * torch.randn(1, HIDDEN, generator=generator)).to(
            dtype
        )
        state[f"{prefix}.activation_bias"] = (0.5 * torch.randn(1, HIDDEN, generator=generator)).to(dtype)
    return state


@pytest.mark.parametrize("as_folder", [False, True])
def test_red_converts_to_the_same_outputs(tmp_path, as_folder):
    state = red_state()
    torch.save(state, tmp_path / "delta_vector.pth")
    model = build("llama")
    config = from_red(
        tmp_path if as_folder else tmp_path / "delta_vector.pth", tmp_path / "ours", base_model=model
    )
    assert [(i.type, i.layer, i.module_path) for i in config.interventions] == [
        ("red", 0, "model.layers.0.mlp.down_proj"),
        ("red", 2, "model.layers.2.mlp.down_proj"),
    ]
    ids = random_ids(2, 6)
    handles = []
    for layer in (0, 2):
        prefix = f"model.layers.{layer}.mlp.down_proj.delta_vector"
        scale, bias = state[f"{prefix}.activation_scaling"], state[f"{prefix}.activation_bias"]
        handles.append(
            model.model.layers[layer].mlp.down_proj.register_forward_hook(
                lambda m, a, out, s=scale, b=bias: out * s + b
            )
        )
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    reft_model = ReftModel.from_pretrained(build("llama"), tmp_path / "ours")
    with torch.no_grad():
        got = reft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_red_keeps_its_dtype_and_fills_missing_halves(tmp_path):
    state = {k: v for k, v in red_state(torch.bfloat16, layers=(1,)).items() if k.endswith("scaling")}
    torch.save(state, tmp_path / "delta_vector.pth")
    from_red(tmp_path, tmp_path / "ours", base_model=build("llama"))
    config, tensors = reft_rs.io.checkpoint.load(tmp_path / "ours", framework="torch")
    assert config["interventions"][0]["dtype"] == "bfloat16"
    [bias] = [v for k, v in tensors.items() if k.endswith(".bias")]
    assert bias.dtype == torch.bfloat16 and (bias == 0).all()


def test_red_without_the_base_model(tmp_path):
    torch.save(red_state(), tmp_path / "delta_vector.pth")
    with pytest.warns(UserWarning, match="does not record the base model"):
        from_red(tmp_path, tmp_path / "ours")
    assert reft_rs.io.checkpoint.load(tmp_path / "ours")[0]["base_model"]["num_hidden_layers"] == 3
    ReftModel.from_pretrained(build("llama"), tmp_path / "ours")


def test_red_errors(tmp_path):
    torch.save({"model.layers.0.mlp.down_proj.weight": torch.zeros(2)}, tmp_path / "delta_vector.pth")
    with pytest.raises(InvalidCheckpointError, match="not a RED delta vector"):
        from_red(tmp_path, tmp_path / "ours", base_model=build("llama"))
    (tmp_path / "delta_vector.pth").write_bytes(b"garbage")
    with pytest.raises(InvalidCheckpointError):
        from_red(tmp_path, tmp_path / "ours", base_model=build("llama"))
    with pytest.raises(reft_rs.CheckpointNotFoundError):
        from_red(tmp_path / "nothing.pth", tmp_path / "ours", base_model=build("llama"))
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("version", ["2.5.1+cu124", "2.1.0", "1.13.1"])
def test_tensor_files_are_refused_on_a_torch_whose_safe_loading_can_be_bypassed(
    tmp_path, monkeypatch, version
):
    """torch.load(weights_only=True) runs code from a crafted file before
    torch 2.6 (CVE-2025-32434): neither importer reads a .bin or .pth there."""
    write_pyreft(tmp_path / "p", [("loreft", 0)])
    torch.save(red_state(layers=(0,)), tmp_path / "delta_vector.pth")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(reft_rs.MissingDependencyError, match=r"torch >= 2\.6.*CVE-2025-32434"):
        from_pyreft(tmp_path / "p", tmp_path / "a", base_model=build("llama"), positions="l1")
    with pytest.raises(reft_rs.MissingDependencyError, match=r"torch >= 2\.6.*CVE-2025-32434"):
        from_red(tmp_path, tmp_path / "b", base_model=build("llama"))
    assert loads == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _tensor_mutations(state):
    """Each tensor of a saved state replaced by wrongly shaped, typed or
    missing values, one at a time: what a damaged or hand-edited file holds.
    A floating-point replacement of the original's shape (or of it without
    a leading axis of 1: RED's ``[1, hidden]`` vectors read as ``[hidden]``)
    is a valid value, not damage, and is left out."""
    for name, value in state.items():
        for label, replacement in [
            ("scalar", torch.tensor(1.0)),
            ("empty", torch.zeros(0)),
            ("one axis", torch.zeros(value.numel() or 3)),
            ("three axes", torch.zeros(2, *value.shape)),
            ("transposed", value.T if value.dim() == 2 else value[None]),
            ("wider", torch.zeros(*value.shape[:-1], value.shape[-1] + 1) if value.dim() else value),
            ("integers", value.to(torch.int64)),
            ("booleans", value > 0),
            ("complex", value.to(torch.complex64)),
        ]:
            same = replacement.shape in (value.shape, value.shape[1:] if value.shape[:1] == (1,) else None)
            if same and replacement.is_floating_point():
                continue
            yield f"{name} {label}", {**state, name: replacement}
        yield f"{name} missing", {k: v for k, v in state.items() if k != name}


#: Tensors a file may lack: pyreft builds NoReFT's and NoDiReFT's projection
#: with or without a bias (``add_bias``), and RED's halves are each optional
#: (the missing one is filled with the identity; see the test above).
OPTIONAL = {
    ("noreft", "proj_layer.bias"),
    ("nodireft", "proj_layer.bias"),
    ("red", "activation_scaling"),
    ("red", "activation_bias"),
}


def _optional(kind, label):
    name, _, what = label.rpartition(" ")
    return what == "missing" and any(k == kind and name.endswith(n) for k, n in OPTIONAL)


@pytest.mark.parametrize("kind", list(CLASSES))
def test_damaged_pyreft_tensors_give_invalid_checkpoint_errors(kind, tmp_path):
    """Every shape, type or gap a damaged tensor file has is refused with an
    InvalidCheckpointError naming the file, and no checkpoint is left behind;
    only a tensor pyreft itself may leave out converts."""
    folder = tmp_path / "p"
    write_pyreft(folder, [(kind, 0)])
    [binary] = list(folder.glob("intkey_*.bin"))
    state = torch.load(binary, weights_only=True)
    mutations = list(_tensor_mutations(state))
    assert len(mutations) >= 4 * len(state)
    for index, (label, mutated) in enumerate(mutations):
        torch.save(mutated, binary)
        out = tmp_path / f"out{index}"
        if _optional(kind, label):
            from_pyreft(folder, out, base_model=build("llama"), positions="l1")
            model = ReftModel.from_pretrained(build("llama"), out)
            with torch.no_grad():
                assert torch.isfinite(model(input_ids=random_ids(1, 6)).logits).all(), label
            continue
        with pytest.raises(InvalidCheckpointError) as caught:
            from_pyreft(folder, out, base_model=build("llama"), positions="l1")
        assert binary.name in str(caught.value) or "intkey_" in str(caught.value), (label, caught.value)
        assert not out.exists(), label


def test_damaged_red_tensors_give_invalid_checkpoint_errors(tmp_path):
    state = red_state(layers=(0,))
    mutations = list(_tensor_mutations(state))
    assert len(mutations) >= 4 * len(state)
    for index, (label, mutated) in enumerate(mutations):
        path = tmp_path / f"delta{index}.pth"
        torch.save(mutated, path)
        out = tmp_path / f"out{index}"
        if _optional("red", label):
            from_red(path, out, base_model=build("llama"))
            model = ReftModel.from_pretrained(build("llama"), out)
            with torch.no_grad():
                assert torch.isfinite(model(input_ids=random_ids(1, 6)).logits).all(), label
            continue
        with pytest.raises(InvalidCheckpointError) as caught:
            from_red(path, out, base_model=build("llama"))
        assert path.name in str(caught.value), (label, caught.value)
        assert not out.exists(), label
