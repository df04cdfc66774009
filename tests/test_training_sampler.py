"""TaskBatchSampler: task-homogeneous micro-batches in a fixed cycle (official stage 1: 1 edit : 3 T2I; stage
2: 1 : 2), one global batch per micro-batch sliced across ranks, fresh permutation per epoch, and the whole
state is one counter, so a run resumes at the exact position.
"""

import itertools

import pytest
from deepgen_components.training.sampler import TaskBatchSampler

STAGE1 = {"edit": 1, "t2i": 3}
STAGE2 = {"edit": 1, "t2i": 2}


def plans(sampler: TaskBatchSampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


def test_stage1_cycle_is_one_edit_then_three_t2i():
    sampler = TaskBatchSampler({"edit": 50, "t2i": 80}, STAGE1, batch_size=2)
    sources = [p.source for p in plans(sampler, 40)]
    assert sources[:8] == ["edit", "t2i", "t2i", "t2i"] * 2
    assert sources.count("edit") == 10 and sources.count("t2i") == 30  # exactly 25% editing


def test_stage2_cycle_is_one_edit_then_two_t2i():
    sampler = TaskBatchSampler({"edit": 50, "t2i": 80}, STAGE2, batch_size=2)
    sources = [p.source for p in plans(sampler, 30)]
    assert sources == ["edit", "t2i", "t2i"] * 10


def test_the_cycle_follows_the_order_the_sources_are_given_in():
    sampler = TaskBatchSampler({"t2i": 9, "edit": 9}, {"t2i": 2, "edit": 1}, batch_size=1)
    assert [p.source for p in plans(sampler, 6)] == ["t2i", "t2i", "edit"] * 2


def test_every_micro_batch_holds_one_source_and_batch_size_samples():
    sampler = TaskBatchSampler({"edit": 7, "t2i": 11}, STAGE1, batch_size=3)
    for plan in plans(sampler, 20):
        assert len(plan.indices) == 3
        assert all(0 <= i < {"edit": 7, "t2i": 11}[plan.source] for i in plan.indices)


def test_the_same_seed_gives_the_same_plans_and_another_seed_another_order():
    make = lambda seed: [p.indices for p in plans(TaskBatchSampler({"a": 100}, {"a": 1}, 4, seed=seed), 10)]
    assert make(0) == make(0)
    assert make(0) != make(1)


def test_without_shuffle_the_stream_is_sequential():
    sampler = TaskBatchSampler({"a": 5}, {"a": 1}, 2, shuffle=False)
    assert [p.indices for p in plans(sampler, 4)] == [(0, 1), (2, 3), (4, 0), (1, 2)]


def test_each_epoch_is_a_permutation_and_epochs_reshuffle():
    length, batch = 12, 4
    sampler = TaskBatchSampler({"a": length}, {"a": 1}, batch, seed=3)
    stream = [i for p in plans(sampler, 3 * length // batch) for i in p.indices]
    epochs = [stream[k * length:(k + 1) * length] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(length))
    assert epochs[0] != epochs[1] != epochs[2]


def test_a_micro_batch_that_crosses_an_epoch_boundary_continues_into_the_next_permutation():
    sampler = TaskBatchSampler({"a": 7}, {"a": 1}, 3, seed=0)
    stream = [i for p in plans(sampler, 7) for i in p.indices]  # 21 = three epochs of 7
    for k in range(3):
        assert sorted(stream[7 * k:7 * (k + 1)]) == list(range(7))


def test_each_source_has_its_own_stream():
    sampler = TaskBatchSampler({"edit": 8, "t2i": 8}, STAGE1, batch_size=2, seed=0)
    edits = [i for p in plans(sampler, 16) if p.source == "edit" for i in p.indices]
    assert sorted(edits) == list(range(8))  # 4 edit micro-batches of 2 = exactly one edit epoch


def test_a_source_with_zero_repeat_never_appears():
    sampler = TaskBatchSampler({"edit": 10, "t2i": 10, "off": 10}, {"edit": 1, "t2i": 3, "off": 0}, 2)
    assert "off" not in {p.source for p in plans(sampler, 100)}
    assert sampler.pattern == ["edit", "t2i", "t2i", "t2i"]


# -- resume ------------------------------------------------------------------------------------------------


def test_state_dict_resumes_at_the_exact_position():
    lengths = {"edit": 13, "t2i": 17}
    reference = plans(TaskBatchSampler(lengths, STAGE1, 3, seed=5), 40)
    first = TaskBatchSampler(lengths, STAGE1, 3, seed=5)
    plans(first, 23)
    state = first.state_dict()
    assert state["position"] == 23

    resumed = TaskBatchSampler(lengths, STAGE1, 3, seed=5)
    resumed.load_state_dict(state)
    assert plans(resumed, 17) == reference[23:]


def test_state_from_another_cycle_or_seed_is_rejected():
    state = TaskBatchSampler({"edit": 9, "t2i": 9}, STAGE1, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="another source cycle or seed"):
        TaskBatchSampler({"edit": 9, "t2i": 9}, STAGE2, 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="another source cycle or seed"):
        TaskBatchSampler({"edit": 9, "t2i": 9}, STAGE1, 2, seed=1).load_state_dict(state)


# -- distributed ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_take_disjoint_slices_of_the_same_global_batch(world_size):
    lengths, batch = {"edit": 11, "t2i": 29}, 3
    single = plans(TaskBatchSampler(lengths, STAGE1, batch * world_size, seed=7), 12)
    ranks = [plans(TaskBatchSampler(lengths, STAGE1, batch, seed=7, rank=r, world_size=world_size), 12)
             for r in range(world_size)]
    for k, whole in enumerate(single):
        slices = [ranks[r][k] for r in range(world_size)]
        assert {s.source for s in slices} == {whole.source}
        assert sum((s.indices for s in slices), ()) == whole.indices  # rank order = global order
        # per-sample seeds use the position in the source stream, the same for any world size
        assert [s.global_offset for s in slices] == [whole.global_offset + r * batch for r in range(world_size)]


# -- arguments -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(rank=2, world_size=2), "rank must be in 0..1"),
        (dict(rank=-1, world_size=2), "rank must be in 0..1"),
        (dict(repeats={"edit": 1}), "must name exactly the sources"),
        (dict(repeats={"edit": 1, "t2i": 3, "extra": 1}), "must name exactly the sources"),
        (dict(lengths={"edit": 0, "t2i": 5}), "source 'edit' is empty"),
        (dict(repeats={"edit": -1, "t2i": 3}), "repeat of source 'edit' must be an int >= 0"),
        (dict(repeats={"edit": 1.5, "t2i": 3}), "repeat of source 'edit' must be an int >= 0"),
        (dict(repeats={"edit": 0, "t2i": 0}), "at least one source needs a repeat >= 1"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = dict(lengths={"edit": 5, "t2i": 5}, repeats=STAGE1, batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        TaskBatchSampler(**args)
