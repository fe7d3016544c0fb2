"""Writes the pyreft fixture of tests/test_convert.py with pyreft itself.

Not run by the tests: the folders it wrote are committed beside it. To
remake them (the same files, up to pickle bytes), in an environment with
pyreft 0.1.0, pyvene 0.1.8 and transformers 4.45.1:

    python tests/data/pyreft/make_fixture.py

It saves a tiny random Llama (``model/``), two pyreft checkpoints trained
by nobody (random weights, strengthened so that they move the logits) and
pyreft's own logits for two prompts at its own intervention locations
(``expected.safetensors``):

- ``unshared/``: ``f2+l2`` without shared weights, six interventions of six
  types on layers given in the order 2, 0, 3 | 3, 0, 2 (pyreft puts the
  first half on the first positions, the second half on the last ones, in
  the order of its ``representations`` list);
- ``shared/``: ``f1+l2`` with shared weights, LoReFT on layers 1, 3, 0.
"""

import os

import pyreft
import torch
import transformers
from pyreft.dataset import get_intervention_locations
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
HIDDEN, RANK = 32, 2
PROMPTS = {"short": 6, "long": 9}


def build(kind, seed):
    torch.manual_seed(seed)
    classes = {
        "loreft": pyreft.LoreftIntervention,
        "noreft": pyreft.NoreftIntervention,
        "direft": pyreft.DireftIntervention,
        "nodireft": pyreft.NodireftIntervention,
        "consreft": pyreft.ConsreftIntervention,
        "lobireft": pyreft.LobireftIntervention,
    }
    options = {"embed_dim": HIDDEN, "low_rank_dimension": RANK, "dtype": torch.float32, "add_bias": True}
    intervention = classes[kind](**options)
    with torch.no_grad():
        for name, value in intervention.named_parameters():
            if "rotate_layer" not in name:
                value.copy_(torch.randn(value.shape) * 2)
    return intervention


def run(name, layers, kinds, positions, share_weights, model, ids_by_prompt):
    representations = [
        {
            "layer": layer,
            "component": "block_output",
            "low_rank_dimension": RANK,
            "intervention": build(kind, seed=100 * index + layer),
        }
        for index, (layer, kind) in enumerate(zip(layers, kinds))
    ]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations))
    expected = {}
    for prompt, ids in ids_by_prompt.items():
        locations = get_intervention_locations(
            last_position=ids.shape[1],
            positions=positions,
            num_interventions=len(layers),
            share_weights=share_weights,
        )
        unit_locations = {"sources->base": (None, torch.tensor([locations]).permute(1, 0, 2).tolist())}
        with torch.no_grad():
            _, out = reft_model({"input_ids": ids}, unit_locations=unit_locations)
        expected[f"{name}.{prompt}.logits"] = out.logits[0].contiguous()
        expected[f"{name}.{prompt}.locations"] = torch.tensor(locations)
    reft_model.save(os.path.join(HERE, name))
    return expected


def main():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(os.path.join(HERE, "model"))
    generator = torch.Generator().manual_seed(1)
    ids_by_prompt = {p: torch.randint(0, 100, (1, n), generator=generator) for p, n in PROMPTS.items()}
    expected = {f"{p}.input_ids": ids for p, ids in ids_by_prompt.items()}
    expected.update(
        run(
            "unshared",
            [2, 0, 3, 3, 0, 2],
            ["loreft", "direft", "noreft", "consreft", "nodireft", "lobireft"],
            "f2+l2",
            False,
            model,
            ids_by_prompt,
        )
    )
    expected.update(run("shared", [1, 3, 0], ["loreft"] * 3, "f1+l2", True, model, ids_by_prompt))
    with torch.no_grad():
        for prompt, ids in ids_by_prompt.items():
            expected[f"base.{prompt}.logits"] = model(input_ids=ids).logits[0].contiguous()
    save_file(expected, os.path.join(HERE, "expected.safetensors"))


if __name__ == "__main__":
    main()
