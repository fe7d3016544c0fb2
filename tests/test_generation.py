"""ReftModel.generate: prompt edits through the KV cache, with and without it,
batched and one by one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import reft_rs  # noqa: E402
from reft_rs import InterventionConfig, ReftConfig, get_reft_model  # noqa: E402

from .tiny_models import build, random_ids  # noqa: E402

NEW = 8


def reft_for(family, **options):
    model = build(family, dtype=torch.float64, seed=3)
    config = ReftConfig.for_layers(
        [0, 2], low_rank_dimension=3, positions="f2+l2", dtype="float64", **options
    )
    reft_model = get_reft_model(model, config)
    with torch.no_grad():  # make the edit strong enough to change greedy choices
        for intervention in reft_model.interventions:
            intervention.weight.mul_(30)
    return reft_model


def greedy(reft_model, ids, mask=None, **kwargs):
    out = reft_model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores, dim=1)


def left_pad(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_batched_left_padded_equals_one_by_one(family):
    reft_model = reft_for(family)
    prompts = [random_ids(1, n, seed=n)[0] for n in (5, 11, 8)]
    singles = [greedy(reft_model, p[None])[0][0] for p in prompts]
    ids, mask = left_pad(prompts)
    batched, _ = greedy(reft_model, ids, mask)
    for row, single in enumerate(singles):
        assert torch.equal(batched[row], single)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("on_generated", [False, True])
def test_the_prompt_is_edited_on_every_step_without_a_cache(family, on_generated):
    reft_model = reft_for(family)
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (6, 9)])
    cached, cached_scores = greedy(reft_model, ids, mask, intervene_on_generated=on_generated)
    uncached, uncached_scores = greedy(
        reft_model, ids, mask, use_cache=False, intervene_on_generated=on_generated
    )
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-9, atol=1e-9)


def test_interventions_change_generation_and_options_matter():
    reft_model = reft_for("llama")
    ids = random_ids(1, 7, seed=1)
    _, edited = greedy(reft_model, ids)
    base = reft_model.model.generate(
        ids,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    plain = torch.stack(base.scores, dim=1)
    assert not torch.allclose(edited[:, 0], plain[:, 0])
    _, also_generated = greedy(reft_model, ids, intervene_on_generated=True)
    torch.testing.assert_close(also_generated[:, 0], edited[:, 0])  # the first token comes from the prompt
    assert not torch.allclose(also_generated[:, 1:], edited[:, 1:])


def test_explicit_locations_equal_the_default_ones():
    reft_model = reft_for("llama")
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (4, 10)])
    locations = reft_rs.positions.locate([4, 10], "f2+l2", padding_side="left")
    default, _ = greedy(reft_model, ids, mask)
    explicit, _ = greedy(reft_model, ids, mask, locations=locations)
    assert torch.equal(default, explicit)
    masked = locations.copy()
    masked[:] = -1
    untouched, _ = greedy(reft_model, ids, mask, locations=masked)
    plain = reft_model.model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
    )
    assert torch.equal(untouched, plain[:, ids.shape[1] :])


def test_steering_vectors_act_on_every_token():
    model = build("llama", dtype=torch.float64, seed=3)
    reft_model = get_reft_model(model, InterventionConfig(layer=1, type="steer", dtype="float64", alpha=4.0))
    with torch.no_grad():
        reft_model.interventions[0].vector.copy_(torch.randn(32, dtype=torch.float64))
    ids = random_ids(1, 5, seed=2)
    cached, scores = greedy(reft_model, ids)
    uncached, scores_uncached = greedy(reft_model, ids, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(scores, scores_uncached, rtol=1e-9, atol=1e-9)
