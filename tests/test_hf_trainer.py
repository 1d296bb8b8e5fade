"""tm.data.hf.Trainer: transformers' Trainer fed by tm.data.DataLoader(format="hf"), checked against an
uninterrupted run: the resumed run sees exactly the same batches and ends with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import tokenmill as tm
import torch
from conftest import hf_llama
from tokenmill.data import DataLoader
from tokenmill.data.dataset import write_token_file

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64


@pytest.fixture
def prefix(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, VOCAB, int(n)).tolist() for n in rng.integers(1, 30, 60)]
    write_token_file(tmp_path / "train", docs, dtype="int32")
    return str(tmp_path / "train")


def tiny_llama():
    return hf_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=64)


class Recording(tm.data.hf.Trainer):
    """Records the input_ids of every micro-batch the model is given."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def compute_loss(self, model, inputs, *a, **kw):
        self.seen.append(inputs["input_ids"].clone())
        return super().compute_loss(model, inputs, *a, **kw)


class StopAt(transformers.TrainerCallback):
    """An interruption: the run stops after step ``n`` (its schedule still planned for max_steps)."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.n:
            control.should_training_stop = True


def args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        save_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def loader(prefix, **kw):
    return DataLoader(prefix, seq_len=16, batch_size=2, packing="best_fit", seed=4, format="hf", **kw)


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("workers", [0, 2])
def test_trainer_runs_and_resumes_exactly(prefix, tmp_path, workers):
    full = Recording(
        model=tiny_llama(),
        args=args(tmp_path / "a", dataloader_num_workers=workers),
        train_dataset=loader(prefix),
    )
    full.train()
    # The batches are the loader's stream, in order.
    expected = [b["input_ids"] for _, b in zip(range(12), loader(prefix))]
    assert len(full.seen) == 12 and all(torch.equal(x, y) for x, y in zip(full.seen, expected))

    # Another run stops after its step-3 checkpoint; a fresh process resumes from it.
    Recording(
        model=tiny_llama(), args=args(tmp_path / "b"), train_dataset=loader(prefix), callbacks=[StopAt(3)]
    ).train()
    resumed = Recording(
        model=tiny_llama(),
        args=args(tmp_path / "b", dataloader_num_workers=workers),
        train_dataset=loader(prefix),
    )
    resumed.train(resume_from_checkpoint=True)
    assert len(resumed.seen) == 6 and all(torch.equal(x, y) for x, y in zip(resumed.seen, expected[6:]))
    want, got = losses(full), {s: v for s, v in losses(resumed).items() if s > 3}
    assert set(got) == {4, 5, 6} and all(abs(got[s] - want[s]) < 1e-6 for s in got)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=name)


def test_trainer_learns_a_predictable_stream(tmp_path):
    """Documents that count upwards (t, t+1, ...): the Trainer's loss falls far below chance (ln 63)."""
    rng = np.random.default_rng(1)
    docs = [
        [(s + i) % (VOCAB - 1) + 1 for i in range(n)]
        for s, n in zip(rng.integers(0, 63, 80), rng.integers(2, 30, 80))
    ]
    write_token_file(tmp_path / "count", docs, dtype="int32")
    t = tm.data.hf.Trainer(
        model=tiny_llama(),
        args=args(tmp_path, max_steps=60, save_steps=1000, gradient_accumulation_steps=1),
        train_dataset=loader(str(tmp_path / "count")),
    )
    t.train()
    ls = list(losses(t).values())
    assert np.mean(ls[:3]) > 3.5 and np.mean(ls[-5:]) < 2.0


def test_trainer_refuses_what_it_cannot_do(prefix, tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="format='hf'"):
        tm.data.hf.Trainer(
            model=model, args=args(tmp_path), train_dataset=DataLoader(prefix, seq_len=16, batch_size=2)
        )
    with pytest.raises(ValueError, match="per_device_train_batch_size is 4"):
        tm.data.hf.Trainer(
            model=model, args=args(tmp_path, per_device_train_batch_size=4), train_dataset=loader(prefix)
        )
    with pytest.raises(ValueError, match="rank 1 of 2"):
        tm.data.hf.Trainer(
            model=model, args=args(tmp_path), train_dataset=loader(prefix, rank=1, world_size=2)
        )
    with pytest.raises(ValueError, match="one Trainer epoch"):
        tm.data.hf.Trainer(
            model=model,
            args=args(tmp_path, max_steps=-1, num_train_epochs=2),
            train_dataset=loader(prefix, epochs=1),
        )
    with pytest.raises(TypeError, match="tokenmill.data.DataLoader"):
        tm.data.hf.Trainer(model=model, args=args(tmp_path), train_dataset=[{"input_ids": torch.zeros(1, 2)}])
    tm.data.hf.Trainer(
        model=model, args=args(tmp_path / "p", max_steps=1, save_steps=1), train_dataset=loader(prefix)
    ).train()
    (tmp_path / "p" / "checkpoint-1" / "tokenmill_loader_rank0.json").unlink()  # as a plain Trainer's
    t = tm.data.hf.Trainer(model=model, args=args(tmp_path / "p"), train_dataset=loader(prefix))
    with pytest.raises(FileNotFoundError, match="no loader state"):
        t.train(resume_from_checkpoint=True)


def test_trainer_evaluates_a_finite_loader_from_its_start(prefix, tmp_path):
    val = DataLoader(prefix, seq_len=16, batch_size=2, epochs=1, drop_last=False, format="hf")
    t = tm.data.hf.Trainer(
        model=tiny_llama(), args=args(tmp_path), train_dataset=loader(prefix), eval_dataset=val
    )
    a, b = t.evaluate()["eval_loss"], t.evaluate()["eval_loss"]
    with torch.no_grad():
        total = n = 0.0
        for batch in DataLoader(prefix, seq_len=16, batch_size=2, epochs=1, drop_last=False, format="hf"):
            logits = t.model(**batch).logits[:, :-1].double()
            lab = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB), lab.reshape(-1), reduction="sum"
            ).item()
            n += (lab != -100).sum().item()
    assert a == b and abs(a - total / n) < 1e-3
