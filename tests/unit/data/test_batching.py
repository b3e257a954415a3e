"""Length-grouped batches and padding to a multiple: fewer padded positions, the same records, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mole.build import build_loaders
from mole.data.collate import Collator, length_grouped_sampler, padding_fraction
from mole.training import checkpoint as ckpt
from mole.training.args import TrainArgs
from mole.utils.errors import MoleConfigError
from tests.conftest import compose_tiny

# 64 records of lengths 1..64 in a scrambled order
LENGTHS = [(7 * i) % 64 + 1 for i in range(64)]
RECORDS = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in LENGTHS]


def test_collator_pads_to_a_multiple_and_masks_the_padding():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=8)([RECORDS[1], RECORDS[2]])  # lengths 8 and 15
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [8, 15]
    assert batch["labels"][0, 8:].eq(-100).all() and batch["labels"][1, 15:].eq(-100).all()
    assert Collator(pad_token_id=0)([RECORDS[1], RECORDS[2]])["input_ids"].shape == (2, 15)


def _batches(loader) -> list[list[int]]:
    return [b["attention_mask"].sum(1).tolist() for b in loader]


def _loader(grouped: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    sampler = length_grouped_sampler(LENGTHS, 4, gen) if grouped else None
    return DataLoader(RECORDS, batch_size=4, shuffle=sampler is None, sampler=sampler, generator=gen,
                      collate_fn=Collator(0))


def test_grouped_batches_hold_every_record_once_with_less_padding_than_random_order():
    random_batches, grouped = _batches(_loader(False)), _batches(_loader(True))
    assert sorted(sum(grouped, [])) == sorted(LENGTHS)
    # 64 records, batches of 4: mega-batches of 16 records (4 batches), each sorted longest first
    assert all(b == sorted(b, reverse=True) for b in grouped)
    assert all(max(grouped[i + 1]) <= min(grouped[i]) for i in range(len(grouped) - 1) if (i + 1) % 4)
    assert padding_fraction(grouped) < 0.5 * padding_fraction(random_batches)


def test_grouped_order_is_random_per_epoch_and_resumes_exactly():
    stream = ckpt.BatchStream(_loader(True, seed=3))
    order = [next(stream)["attention_mask"].sum(1).tolist() for _ in range(32)]  # two epochs of 16 batches
    assert order[:16] != order[16:]  # reshuffled each epoch
    assert order[:16] != _batches(_loader(True, seed=4))  # the order comes from the generator
    resumed = ckpt.BatchStream(_loader(True, seed=3))
    for _ in range(20):
        next(resumed)
    position, tensors = resumed.state_dict()
    other = ckpt.BatchStream(_loader(True, seed=99))  # only the restored generator state gives the same order
    other.resume(position, tensors)
    assert [next(other)["attention_mask"].sum(1).tolist() for _ in range(12)] == order[20:32]


def test_build_loaders_groups_by_length_when_asked():
    cfg = compose_tiny(["data.group_by_length=true", "data.pad_to_multiple_of=8", "trainer.batch_size=4"])
    from mole.model.base import build_model

    _, tokenizer = build_model(cfg.model, seed=0)
    train, _, _ = build_loaders(cfg, tokenizer, TrainArgs.from_config(cfg.trainer))
    assert ckpt.sampler_generator(train) is not None  # the checkpoint's data position covers the grouped sampler
    widths = [b["input_ids"].shape[1] for b in train]
    assert all(w % 8 == 0 for w in widths)


@pytest.mark.parametrize(("override", "key"), [("data.group_by_length=sometimes", "data.group_by_length"),
                                                ("data.pad_to_multiple_of=0", "data.pad_to_multiple_of")])
def test_bad_batching_options_name_the_key(override, key):
    cfg = compose_tiny([override])
    from mole.model.base import build_model

    _, tokenizer = build_model(cfg.model, seed=0)
    with pytest.raises(MoleConfigError, match=key):
        build_loaders(cfg, tokenizer, TrainArgs.from_config(cfg.trainer))
