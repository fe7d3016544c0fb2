"""Steering SmolLM2-135M-Instruct from casual and formal replies: the
behaviour moves with the strength, in the torch path and the Rust engine alike."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

import reft_rs  # noqa: E402
from reft_rs import ReftModel  # noqa: E402
from reft_rs.experiments import steering  # noqa: E402
from reft_rs.io import pretrained  # noqa: E402

pytestmark = pytest.mark.slow

CASUAL = [
    "hey! yeah sure, no worries lol",
    "omg that's awesome, thx a ton!",
    "nah it's cool, catch ya later",
    "lol yep, gonna grab some food",
    "dude that's wild haha",
    "sure thing, see ya soon!",
]
FORMAL = [
    "Certainly. I would be pleased to assist you.",
    "Thank you very much; that is most appreciated.",
    "That will not be necessary. Good day to you.",
    "Indeed. I shall obtain some refreshments.",
    "Sir, that is quite remarkable.",
    "Very well. I look forward to our next meeting.",
]
QUESTION = "Can we meet tomorrow to talk about the project?"
CASUAL_REPLY = "hey sure thing! see ya tomorrow lol"
FORMAL_REPLY = "Certainly. I would be pleased to meet tomorrow."
STRENGTHS = (-4.0, 0.0, 3.0, 7.0)
INFORMAL = {"hey", "buddy", "lol", "gonna", "yeah", "ya", "dude", "cool"}


def informality(text: str) -> int:
    words = "".join(c if c.isalpha() or c.isspace() else " " for c in text.lower()).split()
    return sum(w in INFORMAL for w in words)


def test_a_casual_direction_moves_replies_with_the_strength(tmp_path):
    try:
        pretrained.smollm2_gguf()
    except reft_rs.MissingDependencyError as error:
        pytest.skip(str(error))
    model, tokenizer = pretrained.load_smollm2()

    def as_reply(text: str) -> str:
        messages = [
            {"role": "user", "content": "Reply to my message."},
            {"role": "assistant", "content": text},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False)

    # The chat template's tokens are shared by both sides of every pair, so
    # averaged over the tokens they cancel and the style is what is left.
    steering.steering_checkpoint(
        model,
        tokenizer,
        [as_reply(t) for t in CASUAL],
        [as_reply(t) for t in FORMAL],
        [12],
        tmp_path / "casual",
        read="mean",
    )
    reft_model = ReftModel.from_pretrained(model, tmp_path / "casual")
    engine = reft_rs.Engine(pretrained.smollm2_path(), reft=tmp_path / "casual")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt)["input_ids"]

    def gap(strength: float, logits_of) -> float:
        """Mean log-probability of the casual reply minus the formal one."""
        scores = []
        for reply in (CASUAL_REPLY, FORMAL_REPLY):
            tokens = tokenizer(reply, add_special_tokens=False)["input_ids"]
            logits = torch.as_tensor(logits_of(ids + tokens, strength))[len(ids) - 1 : -1]
            scores.append(logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).mean().item())
        return scores[0] - scores[1]

    def torch_logits(sequence, strength):
        with torch.no_grad():
            return reft_model(input_ids=torch.tensor([sequence]), strength=strength).logits[0]

    torch_gaps = [gap(s, torch_logits) for s in STRENGTHS]
    engine_gaps = [gap(s, lambda seq, s: engine.logits(seq, strength=s)) for s in STRENGTHS]
    assert all(a < b for a, b in zip(torch_gaps, torch_gaps[1:])), torch_gaps
    np.testing.assert_allclose(engine_gaps, torch_gaps, atol=1e-3)

    replies = {}
    for strength in STRENGTHS:
        text = engine.generate(prompt, 24, strength=strength, add_special_tokens=False)[0]
        out = reft_model.generate(
            torch.tensor([ids]),
            max_new_tokens=24,
            do_sample=False,
            strength=strength,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) == text
        replies[strength] = text
    assert len(set(replies.values())) >= 3, replies
    assert informality(replies[7.0]) > informality(replies[0.0]) >= informality(replies[-4.0]), replies
