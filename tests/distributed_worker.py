"""One process of the data-parallel tests (tests/test_distributed.py).

Each run trains the same tiny model on the same four examples, either in
one process on batches of 4 or in two gloo processes on batches of 2 each,
and writes the trained interventions (and the saves each rank made) to
``out``. Started by ``torch.multiprocessing.spawn``, so it lives in a module
the child processes can import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

import reft_rs
from reft_rs import ReftConfig, ReftDataCollator, get_reft_model, make_dataset

from .tiny_models import build, tokenizer

# Every response is two words, so every example has the same number of
# label tokens: the mean loss of the combined batch is then the mean of the
# two halves' mean losses, which is what data parallelism averages.
PROMPTS = ["what colour is the sky", "say hello", "what colour is the grass please", "what colour is the sea"]
RESPONSES = ["blue sky", "hello world", "green grass", "blue sea"]
STEPS = 5


def _setup(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
        )
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _count_saves() -> list[str]:
    """Records every save this process makes (a rank that saves shows up)."""
    saves: list[str] = []
    original = reft_rs.ReftModel.save_pretrained

    def counting(self, folder, *args, **kwargs):
        saves.append(os.fspath(folder))
        return original(self, folder, *args, **kwargs)

    reft_rs.ReftModel.save_pretrained = counting
    return saves


def _finish(out: Path, rank: int, reft_model, saves: list[str], losses: list[float]) -> None:
    """Writes the trained interventions, the saves and the losses of this rank."""
    tensors = {k: v.detach().contiguous() for k, v in reft_model.checkpoint_tensors().items()}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"saves": saves, "losses": losses}))


def _model_and_data(positions: str):
    tok = tokenizer()
    model = build("llama", seed=1, dtype=torch.float64)
    config = ReftConfig.for_layers([0, 2], low_rank_dimension=2, positions=positions)
    torch.manual_seed(7)  # the same initial interventions in every process
    reft_model = get_reft_model(model, config)
    dataset = make_dataset(tok, PROMPTS, RESPONSES, config=config)
    return tok, reft_model, dataset


def plain_loop(rank: int, world: int, port: int, out: str) -> None:
    """AdamW on the ReftModel wrapped in DistributedDataParallel."""
    out = Path(out)
    _setup(rank, world, port)
    saves = _count_saves()
    tok, reft_model, dataset = _model_and_data("f1+l1")
    reft_model.train()
    sampler = (
        torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        if world > 1
        else None
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=len(PROMPTS) // world,
        sampler=sampler,
        collate_fn=ReftDataCollator(tok.pad_token_id),
    )
    module = torch.nn.parallel.DistributedDataParallel(reft_model) if world > 1 else reft_model
    optimizer = torch.optim.AdamW([p for p in reft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        for batch in loader:
            loss = module(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    if rank == 0:
        reft_model.save_pretrained(out / "plain-checkpoint")
    if world > 1:
        torch.distributed.barrier()
    _finish(out, rank, reft_model, saves, losses)
    if world > 1:
        torch.distributed.destroy_process_group()


def trainer(rank: int, world: int, port: int, out: str) -> None:
    """ReftTrainer, launched as torchrun would launch it."""
    out = Path(out)
    _setup(rank, world, port)
    saves = _count_saves()
    tok, reft_model, dataset = _model_and_data("l2")
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=len(PROMPTS) // world,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_steps=STEPS,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    trainer = reft_rs.ReftTrainer(
        model=reft_model, args=args, train_dataset=dataset, data_collator=ReftDataCollator(tok.pad_token_id)
    )
    trainer.train()
    # It really ran data-parallel: two processes, the model wrapped in DDP.
    assert trainer.args.world_size == world
    wrapped = isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    assert wrapped == (world > 1), type(trainer.model_wrapped)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if world > 1:
        torch.distributed.barrier()
    _finish(out, rank, reft_model, saves, losses)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
