"""Importing pyreft checkpoints and RED delta vectors."""

from __future__ import annotations

import collections
import json

import pytest

torch = pytest.importorskip("torch")

import reft_rs  # noqa: E402
from reft_rs import InvalidCheckpointError, ReftModel  # noqa: E402
from reft_rs.convert import from_pyreft, from_red  # noqa: E402

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


def write_pyreft(folder, interventions, *, key_style="underscore"):
    """A pyreft checkpoint folder: config.json + intkey_*.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    representations, types, keys, states = [], [], [], []
    counter = collections.Counter()
    for index, (kind, layer) in enumerate(interventions):
        collision = counter[layer]
        counter[layer] += 1
        if key_style == "underscore":
            key = f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{collision}"
        else:
            key = f"layer.{layer}.comp.block_output.unit.pos.nunit.1#{collision}"
        state, holder = pyreft_state(kind, seed=index, half_precision_source=kind == "loreft")
        torch.save(state, folder / f"intkey_{key}.bin")
        representations.append(
            [layer, "block_output", "pos", 1, RANK, None, None, None, None, None, None, None, None]
        )
        types.append(f"<class 'pyreft.interventions.{CLASSES[kind]}'>")
        keys.append(key)
        states.append((state, holder))
    config = {
        "representations": representations,
        "intervention_types": types,
        "sorted_keys": keys,
        "mode": "parallel",
        "model_type": "<class 'transformers.models.llama.modeling_llama.LlamaForCausalLM'>",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return states


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


def test_a_converted_model_gives_pyreft_outputs(tmp_path):
    # f1+l1 unshared on layers 0 and 2: pyreft's order is prefix, prefix, suffix, suffix
    interventions = [("loreft", 0), ("loreft", 2), ("loreft", 0), ("loreft", 2)]
    states = write_pyreft(tmp_path / "pyreft", interventions)
    model = build("llama")
    config = from_pyreft(tmp_path / "pyreft", tmp_path / "ours", base_model=model, positions="f1+l1")
    assert [(i.layer, i.group) for i in config.interventions] == [(0, 0), (2, 0), (0, 1), (2, 1)]
    ids = random_ids(2, 7)
    locations = reft_rs.positions.locate([7, 7], "f1+l1")
    # pyreft's result, by hand: edit each layer's output at its positions
    handles = []
    for (kind, layer), (state, holder), group in zip(interventions, states, [0, 0, 1, 1]):

        def hook(module, args, output, state=state, holder=holder, kind=kind, group=group):
            hidden = output.clone()
            for row in range(hidden.shape[0]):
                for position in locations[group, row]:
                    if position >= 0:
                        hidden[row, position] = pyreft_edit(kind, state, holder, hidden[row, position])
            return hidden

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    reft_model = ReftModel.from_pretrained(build("llama"), tmp_path / "ours")
    with torch.no_grad():
        got = reft_model(input_ids=ids, locations=locations).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pyreft_conversion_without_the_base_model(tmp_path):
    [(state, holder)] = write_pyreft(tmp_path / "p", [("direft", 1)])
    with pytest.warns(UserWarning, match="does not record the base model"):
        from_pyreft(tmp_path / "p", tmp_path / "out", positions="f1+l1", share_weights=True)
    config, _ = reft_rs.checkpoint.load(tmp_path / "out")
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
    assert reft_rs.checkpoint.load(tmp_path / "again")[0]["base_model"]["num_hidden_layers"] == LAYERS
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
    config, tensors = reft_rs.checkpoint.load(tmp_path / "ours", framework="torch")
    assert config["interventions"][0]["dtype"] == "bfloat16"
    [bias] = [v for k, v in tensors.items() if k.endswith(".bias")]
    assert bias.dtype == torch.bfloat16 and (bias == 0).all()


def test_red_without_the_base_model(tmp_path):
    torch.save(red_state(), tmp_path / "delta_vector.pth")
    with pytest.warns(UserWarning, match="does not record the base model"):
        from_red(tmp_path, tmp_path / "ours")
    assert reft_rs.checkpoint.load(tmp_path / "ours")[0]["base_model"]["num_hidden_layers"] == 3
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
