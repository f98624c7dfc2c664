"""DataLoaderLite against the shards it reads: every token once per epoch, shard edges, state, errors."""

import os

import numpy as np
import pytest
import torch
from conftest import write_shards

from gpt2 import DataLoaderLite, UserError


@pytest.fixture
def numbered(tmp_path):
    """Train shards whose tokens are their own stream positions, so every token can be traced back."""
    data_dir = str(tmp_path / "numbered")
    os.makedirs(data_dir)
    sizes = [1000, 37, 1, 2500, 611]
    stream = np.arange(sum(sizes), dtype=np.uint16)
    for i, piece in enumerate(np.split(stream, np.cumsum(sizes)[:-1])):
        np.save(os.path.join(data_dir, f"edufineweb_train_{i:06d}.npy"), piece)
    np.save(os.path.join(data_dir, "edufineweb_val_000000.npy"), stream[:100])
    return data_dir, stream


def batches(loader, steps):
    return [loader.next_batch() for _ in range(steps)]


def test_every_token_once_per_epoch_across_ranks_and_shard_edges(numbered):
    data_dir, stream = numbered
    B, T, world = 3, 16, 2
    loaders = [DataLoaderLite(data_dir, "train", B, T, rank, world, vocab_size=65536) for rank in range(world)]
    seen = []
    steps = 3 * len(stream) // (B * T * world)  # about three epochs
    for _ in range(steps):
        for loader in loaders:  # rank 0's window, then rank 1's: together one contiguous stretch
            x, y = loader.next_batch()
            assert x.dtype == torch.int64 and x.shape == (B, T) and y.shape == (B, T)
            flat_x, flat_y = x.flatten().numpy(), y.flatten().numpy()
            np.testing.assert_array_equal(flat_y[:-1], flat_x[1:])  # targets are the inputs shifted by one
            assert flat_y[-1] == stream[(flat_x[-1] + 1) % len(stream)]
            seen.append(flat_x)
    seen = np.concatenate(seen)
    expected = np.resize(stream, len(seen))  # the stream, wrapping around at the end of each epoch
    np.testing.assert_array_equal(seen, expected)
    counts = np.bincount(seen[:len(stream)], minlength=len(stream))
    assert (counts == 1).all()


def test_shards_are_memory_mapped(numbered):
    loader = DataLoaderLite(numbered[0], "train", 2, 8)
    assert all(isinstance(s, np.memmap) for s in loader.shards)


def test_state_round_trips_and_resumes_with_another_world_size(numbered):
    data_dir, _ = numbered
    a = DataLoaderLite(data_dir, "train", 2, 8, rank=1, world_size=2, vocab_size=65536)
    batches(a, 7)
    state = a.state_dict()
    b = DataLoaderLite(data_dir, "train", 2, 8, rank=1, world_size=2, vocab_size=65536)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(batches(a, 5), batches(b, 5), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # one rank continues at the first token the two ranks had not read yet
    c = DataLoaderLite(data_dir, "train", 2, 8, rank=0, world_size=1, vocab_size=65536)
    c.load_state_dict(state)
    x0 = DataLoaderLite(data_dir, "train", 2, 8, rank=0, world_size=2, vocab_size=65536)
    x0.load_state_dict(state)
    x1 = DataLoaderLite(data_dir, "train", 2, 8, rank=1, world_size=2, vocab_size=65536)
    x1.load_state_dict(state)
    assert torch.equal(c.next_batch()[0], x0.next_batch()[0])
    assert torch.equal(c.next_batch()[0], x1.next_batch()[0])


def test_val_split_is_read_from_val_shards_and_reset(numbered):
    loader = DataLoaderLite(numbered[0], "val", 2, 8, vocab_size=65536)
    first = loader.next_batch()[0]
    np.testing.assert_array_equal(first.flatten().numpy(), np.arange(16))
    loader.next_batch()
    loader.reset()
    assert torch.equal(loader.next_batch()[0], first)


def test_bad_data_is_a_one_line_error_naming_the_file(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere/ does not exist: run python fineweb.py"):
        DataLoaderLite(missing, "train", 2, 8)

    data_dir = str(tmp_path / "d")
    write_shards(data_dir, [500], "val")
    with pytest.raises(UserError, match=r"no train shards .* run python fineweb.py"):
        DataLoaderLite(data_dir, "train", 2, 8)
    write_shards(data_dir, [500], "train", start_index=1)
    DataLoaderLite(data_dir, "train", 2, 8)  # fine now

    with pytest.raises(UserError, match="hold 500 tokens, fewer than one batch needs"):
        DataLoaderLite(data_dir, "train", 8, 64)

    bad = os.path.join(data_dir, "edufineweb_train_000002.npy")
    np.save(bad, np.arange(100, dtype=np.int32))
    with pytest.raises(UserError, match="000002.npy holds int32.*expected 1-d uint16"):
        DataLoaderLite(data_dir, "train", 2, 8)

    np.save(bad, np.arange(1000, dtype=np.uint16))
    with open(bad, "r+b") as f:
        f.truncate(700)  # cut short, as by a full disk or an interrupted copy
    with pytest.raises(UserError, match="cannot read shard .*000002.npy.*truncated"):
        DataLoaderLite(data_dir, "train", 2, 8)

    np.save(bad, np.full(100, 60000, dtype=np.uint16))
    loader = DataLoaderLite(data_dir, "train", 2, 64, vocab_size=50304)
    with pytest.raises(UserError, match="000002.npy holds token id 60000 >= vocab_size=50304"):
        batches(loader, 5)  # the fifth batch reaches the bad shard

    np.save(bad, np.zeros(0, dtype=np.uint16))
    with pytest.raises(UserError, match="000002.npy is empty"):
        DataLoaderLite(data_dir, "train", 2, 8)
