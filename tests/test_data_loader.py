"""ShardLoader: determinism, exact resume, disjoint ranks, rank concat == one big-batch process."""
import numpy as np
import pytest
import torch

from nanoshift.common import InputError
from nanoshift.data import ShardLoader, shard_name, write_shard


@pytest.fixture
def shards(tmp_path):
    """Three train shards of different lengths; every token is unique: shard i holds i*10000 + position."""
    for i, n in enumerate([1000, 1537, 700]):
        write_shard(tmp_path / shard_name("toy", "train", i), (i * 10000 + np.arange(n)).astype(np.uint16))
    return str(tmp_path / "toy_train_*.bin")


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same(batches_a, batches_b):
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b))


def test_shapes_and_shift(shards):
    x, y = ShardLoader(shards, batch_size=4, seq_len=16).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])


def test_deterministic_from_seed_and_epochs_differ(shards):
    a = take(ShardLoader(shards, 4, 16, seed=1), 60)  # > one epoch (3 shards, ~50 windows)
    b = take(ShardLoader(shards, 4, 16, seed=1), 60)
    c = take(ShardLoader(shards, 4, 16, seed=2), 60)
    assert same(a, b) and not same(a, c)


def test_unshuffled_reads_shards_in_order(shards, tmp_path):
    x, y = ShardLoader(shards, 2, 8, shuffle=False).next_batch()
    from nanoshift.data import read_shard
    first = torch.from_numpy(read_shard(tmp_path / "toy_train_000000.bin")[:17].astype(np.int64))
    assert torch.equal(x.flatten(), first[:-1]) and torch.equal(y.flatten(), first[1:])


def test_resume_gives_identical_batches(shards):
    reference = ShardLoader(shards, 4, 16, seed=3)
    take(reference, 23)
    state = reference.state_dict()
    expected = take(reference, 40)  # crosses shard and epoch boundaries
    resumed = ShardLoader(shards, 4, 16, seed=3)
    resumed.load_state_dict(state)
    assert same(take(resumed, 40), expected)
    resumed.reset()
    assert same(take(resumed, 5), take(ShardLoader(shards, 4, 16, seed=3), 5))


def test_resume_rejects_a_different_geometry(shards):
    state = ShardLoader(shards, 4, 16).state_dict()
    with pytest.raises(ValueError, match="step_tokens"):
        ShardLoader(shards, 2, 16).load_state_dict(state)


@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_disjoint_and_concat_equals_single_process(shards, shuffle):
    world, B, T = 2, 3, 8
    ranks = [ShardLoader(shards, B, T, rank=r, world_size=world, seed=5, shuffle=shuffle) for r in range(world)]
    single = ShardLoader(shards, world * B, T, seed=5, shuffle=shuffle)
    for _ in range(70):  # more than one epoch
        per_rank = [loader.next_batch() for loader in ranks]
        x, y = single.next_batch()
        assert torch.equal(torch.cat([b[0] for b in per_rank]), x)
        assert torch.equal(torch.cat([b[1] for b in per_rank]), y)
    # disjoint: over an epoch no input token position is read by both ranks
    seen = [set(), set()]
    for loader in ranks:
        loader.reset()
    for _ in range(sum(n for _, n in single.windows_per_shard)):
        for r, loader in enumerate(ranks):
            seen[r].update(loader.next_batch()[0].flatten().tolist())
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_errors_name_pattern_and_sizes(tmp_path, shards):
    with pytest.raises(InputError, match="no token shards match .*nothing_here"):
        ShardLoader(str(tmp_path / "nothing_here_*.bin"), 2, 8)
    with pytest.raises(ValueError, match=r"2\*64\*32\+1 = 4097 tokens.*toy_train_000000.bin=1000"):
        ShardLoader(shards, 64, 32, world_size=2)


def test_small_shards_are_skipped(tmp_path):
    write_shard(tmp_path / shard_name("toy", "train", 0), np.arange(10, dtype=np.uint16))
    write_shard(tmp_path / shard_name("toy", "train", 1), np.arange(100, dtype=np.uint16))
    loader = ShardLoader(str(tmp_path / "toy_train_*.bin"), 2, 8, shuffle=False)
    assert [n for _, n in loader.windows_per_shard] == [6]
    assert loader.next_batch()[0][0, 0].item() == 0
