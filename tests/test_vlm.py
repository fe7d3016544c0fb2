"""Vision-language models (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, Gemma 3):
interventions on the language model at text or image positions, or on the
vision encoder, on tiny random models built from each model's own config
classes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import reft_rs  # noqa: E402
from reft_rs import InterventionConfig, ReftConfig, ReftModel, get_reft_model  # noqa: E402
from reft_rs.model.layout import find_layers, resolve  # noqa: E402
from reft_rs.positions import locate_in_tokens  # noqa: E402

from . import reference  # noqa: E402
from .test_seq2seq import capture, loreft_by_hand, red_by_hand, strengthen  # noqa: E402, I001
from .tiny_models import (  # noqa: E402
    IMAGE_TOKEN,
    LAYERS,
    VISION_LANGUAGE,
    VISION_LAYERS,
    VISION_WIDTH,
    build,
    build_for_processor,
    build_vision_language,
    prompt_with_image,
    tokenizer,
    vision_language_inputs,
    vision_language_processor,
)

SPECS = ["f2+l2", "l3", "all", "image", "image:l2", "image:f1+l1", "image:0,-1", "1,-2"]


def test_positions_in_tokens_follow_the_reference_rule():
    """Rust's choice over random prompts with images against the rule
    written plainly in tests/reference.py."""
    rng = random.Random(0)
    for _ in range(300):
        count = rng.randint(1, 5)
        rows, lengths = [], []
        for _ in range(count):
            tokens = [
                IMAGE_TOKEN if rng.random() < 0.4 else rng.randint(1, 50) for _ in range(rng.randint(0, 12))
            ]
            prompt = rng.randint(0, len(tokens))
            rows.append(tokens)
            lengths.append(prompt)
        spec = rng.choice(SPECS)
        share, last = rng.random() < 0.5, rng.random() < 0.5
        side = rng.choice(["left", "right"])
        got = locate_in_tokens(
            rows, lengths, spec, IMAGE_TOKEN, share_weights=share, include_last=last, padding_side=side
        )
        padded = max((len(r) for r in rows), default=0)
        want_rows = []
        for tokens, n in zip(rows, lengths):
            offset = padded - len(tokens) if side == "left" else 0
            chosen = reference.rows_in_tokens(
                tokens, n, spec, IMAGE_TOKEN, share_weights=share, include_last=last
            )
            want_rows.append([[p + offset if p >= 0 else -1 for p in group] for group in chosen])
        assert got.shape[:2] == (len(want_rows[0]), count)
        for example, groups in enumerate(want_rows):
            for group, positions in enumerate(groups):
                row = got[group, example].tolist()
                assert row[: len(positions)] == positions and set(row[len(positions) :]) <= {-1}, (
                    spec,
                    rows[example],
                    lengths[example],
                    row,
                    positions,
                )
    with pytest.raises(reft_rs.PositionError, match="token ids"):
        reft_rs.positions.locate([5], "image")


def inputs_for(family, batch=2, seed=0):
    """Prompts with one image between words (two words before, three after
    in row 0; one and two in row 1, left-padded), random images."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(2, 80, (batch, 5), generator=generator).tolist()
    prompts = [
        prompt_with_image(family, w[:2], w[2:]) if i % 2 == 0 else prompt_with_image(family, w[:1], w[1:3])
        for i, w in enumerate(words)
    ]
    width = max(len(p) for p in prompts)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    images = torch.rand((batch, 3, 16, 16), generator=generator)
    return vision_language_inputs(family, ids, images, mask), prompts


def expected_positions(prompts, width, spec):
    """Per row, the positions the reference rule chooses (left padding)."""
    out = []
    for prompt in prompts:
        groups = reference.rows_in_tokens(
            prompt, len(prompt), spec, IMAGE_TOKEN, share_weights=True, include_last=True
        )
        out.append(sorted(width - len(prompt) + p for p in groups[0] if p >= 0))
    return out


@pytest.mark.parametrize("family", VISION_LANGUAGE)
@pytest.mark.parametrize("spec", ["f2+l2", "image", "image:l2"])
def test_edits_land_on_the_text_or_image_positions_asked_for(family, spec):
    model = build_vision_language(family)
    item = InterventionConfig(
        layer=1, low_rank_dimension=3, positions=spec, share_weights=True, dtype="float64"
    )
    reft_model = get_reft_model(model, item)
    strengthen(reft_model)
    site = resolve(model, reft_model.reft_config.interventions[0])
    _, language = find_layers(model)
    assert site.module is language[1]
    seen, handle = capture(site.module)
    inputs, prompts = inputs_for(family)
    with torch.no_grad():
        plain = model(**inputs).logits  # called directly, the model is unchanged
        edited = reft_model(**inputs).logits
    handle.remove()
    before, after = seen
    changed = (before - after).abs().amax(-1) > 0
    want = torch.zeros_like(changed)
    for row, positions in enumerate(expected_positions(prompts, inputs["input_ids"].shape[1], spec)):
        assert positions, (spec, prompts[row])
        want[row, positions] = True
    assert torch.equal(changed, want)
    tensors = {k.split(".", 1)[1]: v for k, v in reft_model.checkpoint_tensors().items()}
    torch.testing.assert_close(
        after[want].double(), loreft_by_hand(before, tensors)[want], rtol=1e-5, atol=1e-5
    )
    assert not torch.equal(plain, edited)


def assert_red_everywhere(model, reft_model, site, family):
    """The RED intervention at ``site`` changes every value there by its
    formula, and the model's logits with it."""
    seen, handle = capture(site.module)
    inputs, _ = inputs_for(family)
    with torch.no_grad():
        plain = model(**inputs).logits
        edited = reft_model(**inputs).logits
    handle.remove()
    before, after = seen
    tensors = {k.split(".", 1)[1]: v for k, v in reft_model.checkpoint_tensors().items()}
    torch.testing.assert_close(after.double(), red_by_hand(before, tensors), rtol=1e-5, atol=1e-5)
    assert not torch.equal(plain, edited)


@pytest.mark.parametrize("family", VISION_LANGUAGE)
def test_the_vision_tower_edits_every_patch(family):
    model = build_vision_language(family)
    item = InterventionConfig(layer=0, tower="vision", type="red")
    assert item.positions == "all"
    reft_model = get_reft_model(model, item)
    assert reft_model.interventions[0].dim == VISION_WIDTH == item.embed_dim
    strengthen(reft_model)
    _, vision = find_layers(model, "vision")
    assert len(vision) == VISION_LAYERS
    site = resolve(model, item)
    assert site.module is vision[0]
    assert_red_everywhere(model, reft_model, site, family)


@pytest.mark.parametrize("family", VISION_LANGUAGE)
def test_the_projector_edits_every_image_feature(family):
    model = build_vision_language(family)
    item = InterventionConfig(layer=0, component="projector.block_output", type="red")
    reft_model = get_reft_model(model, item)
    assert reft_model.interventions[0].dim == model.config.get_text_config().hidden_size
    strengthen(reft_model, seed=6)
    site = resolve(model, item)
    assert site.path.rsplit(".", 1)[-1] in ("multi_modal_projector", "connector", "merger")
    assert_red_everywhere(model, reft_model, site, family)
    with pytest.raises(reft_rs.ConfigError, match="the projector is one step"):
        InterventionConfig(layer=1, tower="projector", type="red")
    with pytest.raises(reft_rs.IncompatibleModelError, match="no vision-language projector"):
        get_reft_model(build("llama"), InterventionConfig(layer=0, tower="projector", type="red"))


@pytest.mark.parametrize("family", VISION_LANGUAGE)
def test_a_batch_gives_what_each_example_gives_alone_and_generation_agrees(family):
    model = build_vision_language(family)
    config = ReftConfig(
        [
            InterventionConfig(layer=0, low_rank_dimension=2, positions="image:l2", share_weights=True),
            InterventionConfig(layer=2, low_rank_dimension=2, positions="l1"),
            InterventionConfig(layer=1, tower="vision", type="red"),
        ]
    )
    reft_model = get_reft_model(model, config)
    strengthen(reft_model, seed=1)
    inputs, prompts = inputs_for(family)
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        together = reft_model(**inputs).logits
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            single = {
                key: value[row : row + 1] if key not in ("pixel_values", "image_grid_thw") else value
                for key, value in inputs.items()
            }
            single["input_ids"], single["attention_mask"] = ids, torch.ones_like(ids)
            for key in ("mm_token_type_ids", "token_type_ids"):
                if key in single:
                    single[key] = single[key][:, width - len(prompt) :]
            if family in ("qwen2_vl", "qwen2_5_vl"):
                single["pixel_values"] = inputs["pixel_values"][16 * row : 16 * (row + 1)]
                single["image_grid_thw"] = inputs["image_grid_thw"][row : row + 1]
            else:
                single["pixel_values"] = inputs["pixel_values"][row : row + 1]
            alone = reft_model(**single).logits
            torch.testing.assert_close(together[row, width - len(prompt) :], alone[0], rtol=1e-4, atol=1e-4)
    options = {"max_new_tokens": 5, "do_sample": False}
    cached = reft_model.generate(**inputs, **options)
    uncached = reft_model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, model.generate(**inputs, **options))  # the edits matter


@pytest.mark.parametrize("family", VISION_LANGUAGE)
def test_save_and_load_are_exact_and_record_the_tower_and_the_rule(family, tmp_path):
    config = ReftConfig(
        [
            InterventionConfig(layer=LAYERS - 1, low_rank_dimension=2, positions="image:f1+l1"),
            InterventionConfig(layer=VISION_LAYERS - 1, component="vision.mlp_output", low_rank_dimension=2),
        ]
    )
    reft_model = get_reft_model(build_vision_language(family), config)
    strengthen(reft_model, seed=2)
    reft_model.save_pretrained(tmp_path / "adapter")
    stored = json.loads((tmp_path / "adapter" / "reft_config.json").read_text())
    entries = [(i.get("tower"), i["component"], i["positions"]) for i in stored["interventions"]]
    assert entries == [
        (None, "block_output", "image:f1+l1"),
        (None, "block_output", "image:f1+l1"),
        ("vision", "mlp_output", "all"),
    ]
    assert stored["base_model"]["num_vision_layers"] == VISION_LAYERS
    assert stored["base_model"]["num_hidden_layers"] == LAYERS
    reloaded = ReftModel.from_pretrained(build_vision_language(family), tmp_path / "adapter")
    inputs, _ = inputs_for(family)
    with torch.no_grad():
        assert torch.equal(reft_model(**inputs).logits, reloaded(**inputs).logits)


def colour_task(family, count=16, seed=0):
    """Red or blue images: the reply after the prompt is token 5 for red,
    token 6 for blue (the loss covers that token only)."""
    generator = torch.Generator().manual_seed(seed)
    red = torch.arange(count) % 2 == 0
    images = torch.rand((count, 3, 16, 16), generator=generator) * 0.2
    images[red, 0] += 0.8
    images[~red, 2] += 0.8
    prompt = prompt_with_image(family, [10, 11], [12, 13])
    ids = torch.tensor([[*prompt, 0]] * count)
    ids[:, -1] = torch.where(red, 5, 6)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    inputs = vision_language_inputs(family, ids, images)
    inputs["labels"] = labels
    return inputs, red


@pytest.mark.parametrize("family", VISION_LANGUAGE)
def test_training_at_image_positions_learns_the_colour_of_an_image(family):
    model = build_vision_language(family, init_range=0.3)
    frozen = {name: p.clone() for name, p in model.named_parameters()}
    config = ReftConfig.for_layers(range(LAYERS), low_rank_dimension=4, positions="image", share_weights=True)
    reft_model = get_reft_model(model, config)
    reft_model.train()
    inputs, red = colour_task(family)
    optimizer = torch.optim.Adam([p for p in reft_model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(60):
        loss = reft_model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    reft_model.eval()
    fresh, red = colour_task(family, count=8, seed=1)  # unseen images
    with torch.no_grad():
        logits = reft_model(**{k: v for k, v in fresh.items() if k != "labels"}).logits[:, -2]
    guessed = logits[:, [5, 6]].argmax(-1) == 0
    assert int((guessed == red).sum()) >= 7, (guessed, red)  # chance is 4 of 8
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, frozen[name]), name


def test_towers_and_image_positions_are_refused_where_they_do_not_apply(tmp_path):
    llava = build_vision_language("llava")
    with pytest.raises(reft_rs.ConfigError, match="every image feature"):
        InterventionConfig(layer=0, tower="vision", low_rank_dimension=2, positions="l1")
    with pytest.raises(reft_rs.IncompatibleModelError, match="vision-language model"):
        get_reft_model(llava, InterventionConfig(layer=0, tower="encoder", type="red"))
    with pytest.raises(reft_rs.ConfigError, match="the model has 2 layers"):
        get_reft_model(llava, InterventionConfig(layer=2, tower="vision", type="red"))
    llama = build("llama")
    with pytest.raises(reft_rs.IncompatibleModelError, match="has none"):
        get_reft_model(llama, InterventionConfig(layer=0, tower="vision", type="red"))
    # An image spec on a text model, or on another stack: refused when built.
    image = InterventionConfig(layer=0, low_rank_dimension=2, positions="image")
    with pytest.raises(reft_rs.IncompatibleModelError, match="has no image token"):
        get_reft_model(llama, image)
    with pytest.raises(reft_rs.ConfigError, match="leave tower unset"):
        InterventionConfig(layer=0, low_rank_dimension=2, positions="image:l2", tower="decoder")
    # Positions on a vision-language model are found in the ids.
    reft_model = get_reft_model(llava, InterventionConfig(layer=0, low_rank_dimension=2, positions="l1"))
    inputs, _ = inputs_for("llava")
    embeds = llava.get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(reft_rs.LocationError, match="input ids"):
        reft_model(inputs_embeds=embeds, **inputs)
    # A vision layer after the one the model reads its image features from.
    llava.config.vision_feature_layer = -2
    with pytest.raises(reft_rs.ConfigError, match="would change nothing"):
        get_reft_model(llava, InterventionConfig(layer=VISION_LAYERS - 1, tower="vision", type="red"))
    get_reft_model(llava, InterventionConfig(layer=VISION_LAYERS - 2, tower="vision", type="red"))
    # The engine runs text models: image positions are refused with the reason.
    from reft_rs.io import checkpoint

    get_reft_model(llama, InterventionConfig(layer=0, low_rank_dimension=2)).save_pretrained(
        tmp_path / "plain"
    )
    config, tensors = checkpoint.load(tmp_path / "plain")
    config["interventions"][0]["positions"] = "image"
    checkpoint.save(tmp_path / "adapter", config, tensors)
    llama.save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    with pytest.raises(reft_rs.IncompatibleModelError, match="choose image tokens"):
        reft_rs.Engine(tmp_path / "model", reft=tmp_path / "adapter")


@pytest.mark.parametrize("family", VISION_LANGUAGE)
def test_generation_equals_the_formula_applied_by_hand(family):
    """Greedy generation with a LoReFT at the image tokens equals the plain
    model's generation with the formula applied at those positions by a
    hook of the test's own, in the prompt's pass only."""
    model = build_vision_language(family, init_range=0.3)
    item = InterventionConfig(layer=1, low_rank_dimension=3, positions="image:f2+l2", share_weights=True)
    reft_model = get_reft_model(model, item)
    strengthen(reft_model, seed=5)
    inputs, prompts = inputs_for(family)
    width = inputs["input_ids"].shape[1]
    chosen = expected_positions(prompts, width, "image:f2+l2")
    tensors = {k.split(".", 1)[1]: v for k, v in reft_model.checkpoint_tensors().items()}

    def hook(module, args, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        if hidden.shape[1] != width:  # a decoding step: the prompt is in the cache
            return None
        for row, positions in enumerate(chosen):
            hidden[row, positions] = loreft_by_hand(hidden[row, positions], tensors).to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    options = {"max_new_tokens": 6, "do_sample": False}
    edited = reft_model.generate(**inputs, **options)
    _, language = find_layers(model)
    handle = language[1].register_forward_hook(hook)
    try:
        by_hand = model.generate(**inputs, **options)
    finally:
        handle.remove()
    assert torch.equal(edited, by_hand)
    assert not torch.equal(edited, model.generate(**inputs, **options))


def test_prefix_caching_stays_off_with_the_reason():
    config = InterventionConfig(layer=0, low_rank_dimension=2, positions="l1")
    reft_model = get_reft_model(build_vision_language("llava"), config)
    assert "vision-language" in reft_model.prefix_cache_blocker()


# ---------------------------------------------------------------- datasets from images


def picture(colour: str, seed: int):
    """A 20×24 picture, mostly red or mostly blue."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (20, 24, 3))
    pixels[..., 0 if colour == "red" else 2] += 190
    return Image.fromarray(pixels.astype("uint8"))


def test_datasets_from_images_are_what_the_processor_makes(tmp_path):
    """make_dataset with the model's processor: the prompt is exactly the
    processor's encoding of the chat template's user turn with the image,
    the labels are the reply and the end of the turn, positions follow the
    reference rule over the ids, and batches carry the processor's features
    (one image as a file path, the rest as PIL images)."""
    processor = vision_language_processor("llava")
    tok = processor.tokenizer
    prompts = ["what colour is the sky", "say hello", "what colour is this"]
    responses = ["blue", "hello world", "red"]
    images = [picture("blue", 0), picture("red", 1), tmp_path / "red.png"]
    picture("red", 2).save(images[2])
    config = ReftConfig([InterventionConfig(layer=0, low_rank_dimension=2, positions="image:l2")])
    dataset = reft_rs.make_dataset(processor, prompts, responses, images=images, config=config)
    image_id = tok.convert_tokens_to_ids("<image>")
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        item = dataset[index]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        opened = reft_rs.training.images.open_image(images[index])
        expected = processor(images=[opened], text=[text], return_tensors="np")
        n = expected["input_ids"].shape[1]
        assert item["input_ids"][:n].tolist() == expected["input_ids"][0].tolist()
        assert (item["input_ids"][:n] == image_id).sum() == 16
        assert item["labels"][:n].tolist() == [-100] * n
        assert tok.decode(item["labels"][n:]) == f"{response} </s>"
        np.testing.assert_array_equal(item["pixel_values"], expected["pixel_values"])
        rule = reference.rows_in_tokens(
            item["input_ids"].tolist(), n, "image:l2", image_id, share_weights=False, include_last=True
        )
        assert item["locations"].tolist() == rule
    # A batch: the processor's own batch layout for the features.
    batch = reft_rs.ReftDataCollator(tok.pad_token_id)([dataset[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "locations", "pixel_values"}
    opened = [reft_rs.training.images.open_image(i) for i in images]
    together = processor(images=opened, text=["<image> x"] * 3, return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], together["pixel_values"], rtol=0, atol=0)
    collated = dataset.collate([0, 1, 2], tok.pad_token_id)
    assert all(torch.equal(collated[k], batch[k]) for k in batch)
    with pytest.raises(reft_rs.ConfigError, match="processor"):
        reft_rs.make_dataset(tok, prompts, responses, images=images)
    with pytest.raises(reft_rs.DatasetError, match="not a readable image"):
        reft_rs.make_dataset(processor, prompts[:1], responses[:1], images=[tmp_path / "missing.png"])


def test_a_model_trained_on_an_image_dataset_names_colours():
    """The whole path on a tiny LLaVA: make_dataset with the processor,
    reft_rs.train with the default collator, then exact_match on unseen
    pictures, generated with their image features."""
    from reft_rs.training.evaluation import evaluate

    processor = vision_language_processor("llava")
    model = build_for_processor("llava", processor, init_range=0.3)
    config = ReftConfig.for_layers(range(LAYERS), low_rank_dimension=4, positions="image", share_weights=True)
    reft_model = get_reft_model(model, config)

    def colours(count, seed):
        names = ["red" if i % 2 == 0 else "blue" for i in range(count)]
        images = [picture(name, seed * 100 + i) for i, name in enumerate(names)]
        return reft_rs.make_dataset(
            processor, ["what colour is this"] * count, names, images=images, config=config
        )

    train, unseen = colours(16, 0), colours(8, 1)
    pad = processor.tokenizer.pad_token_id
    before = evaluate(reft_model, unseen, "loss", tokenizer=processor)
    reft_rs.train(
        reft_model,
        train,
        collator=reft_rs.ReftDataCollator(pad),
        epochs=40,
        batch_size=8,
        learning_rate=5e-2,
        progress=False,
    )
    assert evaluate(reft_model, unseen, "loss", tokenizer=processor) < 0.3 * before
    assert evaluate(reft_model, unseen, "exact_match", tokenizer=processor, max_new_tokens=2) >= 7 / 8


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "gemma3"])
def test_batches_of_image_features_are_laid_out_as_each_model_reads_them(family):
    """Examples carrying their own features in each processor's layout
    (Qwen2-VL's flattened patches and grid, Idefics3's images per example,
    Gemma 3's token types) batch into what the model reads: each row of the
    batch gives what the example gives alone."""
    from reft_rs.training.data import ReftDataset

    model = build_vision_language(family)
    sequences, features = [], []
    for index, (before, after) in enumerate([([10, 11], [12, 13, 5]), ([14], [15])]):
        ids = torch.tensor([prompt_with_image(family, before, after)])
        alone = vision_language_inputs(
            family, ids, torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(index))
        )
        sequences.append(ids[0].numpy())
        features.append(
            {
                k: v[0].numpy() if k.endswith("token_type_ids") else v.numpy()
                for k, v in alone.items()
                if k not in ("input_ids", "attention_mask")
            }
        )
    dataset = ReftDataset.from_sequences(sequences, [len(s) for s in sequences], features=features)
    for side in ("left", "right"):
        batch = dataset.collate([0, 1], 0, padding_side=side)
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            together = model(**batch).logits
            for row, ids in enumerate(sequences):
                single = dataset.collate([row], 0)
                alone = model(**single).logits[0]
                where = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
                torch.testing.assert_close(together[row, where], alone, rtol=1e-4, atol=1e-4)


def test_the_command_line_trains_generates_and_evaluates_with_pictures(tmp_path, capsys):
    """reft-rs train / generate / eval on a LLaVA folder (model and processor)
    with a dataset whose records name their pictures (paths relative to the
    dataset file)."""
    from reft_rs.cli import main

    processor = vision_language_processor("llava")
    build_for_processor("llava", processor, init_range=0.3).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "data" / "pictures").mkdir(parents=True)
    for split, count, seed in (("train", 16, 0), ("dev", 6, 1)):
        with open(tmp_path / "data" / f"{split}.jsonl", "w") as handle:
            for i in range(count):
                colour = "red" if i % 2 == 0 else "blue"
                picture(colour, seed * 100 + i).save(tmp_path / "data" / "pictures" / f"{split}{i}.png")
                record = {
                    "prompt": "what colour is this",
                    "response": colour,
                    "image": f"pictures/{split}{i}.png",
                }
                handle.write(json.dumps(record) + "\n")
    model = ["--model", str(tmp_path / "model"), "--device", "cpu"]
    code = main(
        ["train", *model, "--data", str(tmp_path / "data" / "train.jsonl"), "--output", str(tmp_path / "run")]
        + ["--layers", "0,1,2", "--positions", "image", "--share-weights", "--rank", "4", "--epochs", "40"]
        + ["--learning-rate", "5e-2", "--batch-size", "8"]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["losses"][-1] < 0.3 * metrics["losses"][0], metrics["losses"]
    stored = json.loads((tmp_path / "run" / "reft_config.json").read_text())
    assert {i["positions"] for i in stored["interventions"]} == {"image"}
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "run")]) == 0
    assert "3 layers + a 2-layer vision encoder" in capsys.readouterr().out
    common = ["--checkpoint", str(tmp_path / "run"), *model, "--max-new-tokens", "2"]
    code = main(["eval", *common, "--data", str(tmp_path / "data" / "dev.jsonl")])
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["exact_match"] >= 5 / 6, scores
    red, blue = tmp_path / "data" / "pictures" / "dev0.png", tmp_path / "data" / "pictures" / "dev1.png"
    prompt = ["--prompt", "what colour is this"] * 2
    assert main(["generate", *common, *prompt, "--image", str(red), "--image", str(blue)]) == 0
    assert capsys.readouterr().out.split() == ["red", "blue"]
    assert main(["generate", *common, *prompt, "--image", str(red), "--engine", "rust"]) != 0
    assert "Rust engine runs text models" in capsys.readouterr().err
    # Without a picture the model still answers, from the chat template's text alone.
    assert main(["generate", *common, "--prompt", "what colour is this"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
