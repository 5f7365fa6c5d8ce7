"""The DaliLoader adapter on the CPU path: batches, dtypes, masks, sharding, seeds."""
import pytest
import torch
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.errors import DataError
from mscn.pipelines import (MscnBatch, build_eval_loader, build_train_loader, output_names, rank_seed,
                            resolve_source, views_pipeline)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("loader"), classes=3, per_class=16)  # 48 images


def epoch_indices(loader) -> list[int]:
    return [i for b in loader for i in b.index.tolist()]


def test_train_batch_is_typed_and_masked(folder):
    cfg = tiny_cfg(folder, "train.global_batch=8", "data.output_dtype=bfloat16")
    loader = build_train_loader(cfg)
    assert len(loader) == 48 // 8
    batch = next(iter(loader))
    assert isinstance(batch, MscnBatch) and len(batch.views) == 4
    for v in batch.views:
        assert v.shape == (8, 3, 32, 32) and v.dtype == torch.bfloat16 and v.device.type == "cpu"
    source = resolve_source(str(folder))
    assert batch.labels.dtype == torch.int64 and batch.index.dtype == torch.int64
    assert batch.labels.tolist() == [source.labels[i] for i in batch.index.tolist()]
    # view 0 masks 15% of 8 px cells, half of them zero-filled. The same seed gives the same
    # views unmasked, which hold exact zeros too (~1% of pixels: flat regions that the colour
    # jitter saturates have a zero high-pass), so count the zeros the masks added.
    plain = next(iter(build_train_loader(cfg, apply_mask=False)))
    assert torch.equal(plain.index, batch.index)
    added = (batch.views[0] == 0).float().mean().item() - (plain.views[0] == 0).float().mean().item()
    assert added > 0.02


def test_float16_comes_from_dali_and_highpass_is_zero_mean(folder):
    cfg = tiny_cfg(folder, "train.global_batch=8", "data.output_dtype=float16")
    batch = next(iter(build_train_loader(cfg, apply_mask=False)))
    v = batch.views[1].float()
    assert batch.views[1].dtype == torch.float16
    assert abs(v.mean().item()) < 0.05 and 0.05 < v.std().item() < 2.0  # high-passed: centred on 0


@pytest.mark.parametrize("world", [2])
def test_train_shards_partition_each_epoch(folder, world):
    """DROP, 48 images, 2 ranks x 8: each epoch the ranks' indices are disjoint and cover
    the dataset (shards move between epochs but stay a partition)."""
    cfg = tiny_cfg(folder, "train.global_batch=16")
    loaders = [build_train_loader(cfg, rank=r, world_size=world, apply_mask=False) for r in range(world)]
    assert [len(ld) for ld in loaders] == [3, 3]
    for _ in range(2):
        per_rank = [epoch_indices(ld) for ld in loaders]
        assert all(len(ix) == len(set(ix)) == 24 for ix in per_rank)
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert set(per_rank[0]) | set(per_rank[1]) == set(range(48))


def test_train_shards_stay_a_partition_when_ranks_do_not_divide_the_dataset(tmp_path):
    """26 images on 4 ranks x 1: DALI's rotation of unequal shards (6/7 images) drifted, an
    epoch reading as few as 16 distinct images of its 24. With the reader's list made 28
    long (two images listed twice), every epoch reads >= 24 - 2 distinct ones, and an image
    listed twice keeps its own index (so its label)."""
    from mscn.pipelines.readers import even_order

    root = make_folder(tmp_path, classes=2, per_class=13)
    cfg = tiny_cfg(root, "train.global_batch=4", "data.shuffle_buffer=4")
    loaders = [build_train_loader(cfg, rank=r, world_size=4, apply_mask=False) for r in range(4)]
    assert [len(ld) for ld in loaders] == [7] * 4
    seen = set()
    for _ in range(6):
        ix = [i for ld in loaders for i in epoch_indices(ld)]
        assert len(ix) == 28 and len(set(ix)) >= 26 - 2 and set(ix) <= set(range(26))
        seen |= set(ix)
    assert seen == set(range(26))
    assert even_order(26, 4) == [*range(26), 0, 13] and even_order(24, 4) == list(range(24))
    assert loaders[0].state_dict()["even_shards"] is True


def test_a_loader_on_the_evened_list_resumes_exactly_across_epochs(tmp_path):
    """DALI's checkpoint of a reader whose list holds files twice: the resumed loader
    yields the same batches as the one that went on (over an epoch boundary)."""
    import torch

    from mscn.pipelines import endless

    root = make_folder(tmp_path, classes=1, per_class=10)  # 10 on 4 ranks: 12 listed, 3 per rank
    cfg = tiny_cfg(root, "train.global_batch=4")
    first = build_train_loader(cfg, rank=3, world_size=4)
    it = endless(first)
    next(it)
    state = first.state_dict()
    expected = [next(it) for _ in range(4)]
    resumed = endless(build_train_loader(cfg, rank=3, world_size=4, state=state))
    for a in expected:
        b = next(resumed)
        assert torch.equal(a.index, b.index) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))


def test_a_loader_state_from_before_even_shards_continues_with_its_own_list(tmp_path):
    """A state saved before the key existed was saved by a reader of the plain list: it is
    continued with that list (a DALI checkpoint fits only the reader it came from)."""
    root = make_folder(tmp_path, classes=1, per_class=10)
    cfg = tiny_cfg(root, "train.global_batch=4")
    first = build_train_loader(cfg, rank=1, world_size=4, apply_mask=False)
    next(iter(first))
    old = {k: v for k, v in first.state_dict().items() if k != "even_shards"}
    assert build_train_loader(cfg, rank=1, world_size=4, apply_mask=False, state=old).replay.even_shards is False
    assert build_train_loader(cfg, rank=1, world_size=4, apply_mask=False,
                              state=first.state_dict()).replay.even_shards is True


def test_drift_is_said_where_the_shards_stay_unequal():
    from mscn.data.source import Source
    from mscn.pipelines.readers import drift_note

    shards = Source(kind="wds", root="/d", num_samples=10, tars=("/d/a.tar",), indexes=("/d/a.idx",))
    files = Source(kind="folder", root="/d", num_samples=10, files=tuple(f"{i}.jpg" for i in range(10)))
    assert "tar shards are read as they are" in drift_note(shards, 4)
    assert drift_note(shards, 5) is None and drift_note(shards, 1) is None  # 10 = 2 x 5; one rank never drifts
    assert drift_note(files, 4) is None  # evened
    assert "saved before" in drift_note(files, 4, even_shards=False)


def test_a_library_loader_over_drifting_shards_warns_on_rank_0(tmp_path):
    """``mscn pretrain`` says at its start that tar shards of a count the ranks do not divide
    drift; a loader built by another project's code said nothing. Rank 0 warns now; a
    folder of the same images (evened) does not."""
    import warnings

    from mscn.data.pack import pack
    from mscn.pipelines import ShardDriftWarning

    root = make_folder(tmp_path / "ds", classes=3, per_class=5)  # 15 images: 2 ranks do not divide them
    pack(root, tmp_path / "wds", shard_size=8, progress=False, workers=1)
    for data, rank, warned in ((tmp_path / "wds", 0, True), (tmp_path / "wds", 1, False), (root, 0, False)):
        cfg = tiny_cfg(data, "train.global_batch=4")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_train_loader(cfg, rank=rank, world_size=2, apply_mask=False)
        drift = [str(w.message) for w in caught if issubclass(w.category, ShardDriftWarning)]
        assert bool(drift) == warned, (data, rank, drift)
        if warned:
            assert drift[0].startswith("15 samples do not split evenly over 2 ranks and tar shards are read as they "
                                       "are"), drift


def test_eval_shards_read_every_sample_once(tmp_path):
    """PARTIAL, 47 images (odd), 2 ranks x batch 5: padding never reaches the user."""
    root = make_folder(tmp_path, classes=1, per_class=47)
    cfg = tiny_cfg(root)
    per_rank = [epoch_indices(build_eval_loader(cfg, str(root), rank=r, world_size=2, batch_size=5))
                for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(47))
    # classes as one string was read as its characters: "class 'c0' is not among the 2 classes"
    with pytest.raises(TypeError, match="classes: expected a tuple of class names"):
        build_eval_loader(cfg, str(root), classes="c0")


def test_same_seed_same_batch_other_rank_other_augmentations(folder):
    cfg = tiny_cfg(folder, "train.global_batch=8", "train.seed=3")
    a, b = (next(iter(build_train_loader(cfg))) for _ in range(2))
    assert torch.equal(a.index, b.index) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    # same samples (one unshuffled shard), the seeds of two ranks: the views differ
    source = resolve_source(str(folder))
    outs = []
    for rank in (0, 1):
        pipe = views_pipeline(source, cfg.views, image_size=32, highpass=None, shuffle=False, batch_size=8,
                              num_threads=1, device_id=None, seed=rank_seed(3, rank))
        pipe.build()
        outs.append(dict(zip(output_names(4, source), pipe.run())))
    assert (outs[0]["index"].as_array() == outs[1]["index"].as_array()).all()
    assert not (outs[0]["view0"].as_array() == outs[1]["view0"].as_array()).all()


def test_fewer_images_than_a_global_batch_fail_at_start(folder):
    cfg = tiny_cfg(folder, "train.global_batch=64")
    with pytest.raises(DataError, match="48 images, fewer than one global batch of 64"):
        build_train_loader(cfg)


def test_linear_probe_views_and_eval_view(folder):
    cfg = tiny_cfg(folder)
    train = build_eval_loader(cfg, str(folder), batch_size=8, train_views=True)
    batch = next(iter(train))
    assert len(batch.views) == 1 and batch.views[0].shape == (8, 3, 32, 32) and len(train) == 6
    val = build_eval_loader(cfg, str(folder), batch_size=10)
    assert len(val) == 5 and sorted(epoch_indices(val)) == list(range(48))


def test_highpass_in_dali_or_in_the_loader_gives_the_same_views(folder):
    """highpass.where: DALI's blur (before the normalization) and the loader's two matmuls
    (after it) are the same filter (paper §5.1), so the same seed gives the same views."""
    base = ["train.global_batch=8", "data.output_dtype=float32"]
    views = {}
    from mscn.pipelines.loader import plan

    for where in ("pipeline", "loader"):
        cfg = tiny_cfg(folder, *base, f"highpass.where={where}")
        p = plan(cfg, None)  # the CPU path: auto would be the loader
        assert (p.highpass_in_pipeline is not None, p.highpass_in_adapter is not None) == (
            (True, False) if where == "pipeline" else (False, True))
        views[where] = next(iter(build_train_loader(cfg, apply_mask=False))).views
    for a, b in zip(views["pipeline"], views["loader"]):
        assert a.abs().mean() > 0.05  # high-passed views, not zeros
        assert (a - b).abs().max() < 1e-4


def test_a_loader_state_that_cannot_continue_here_is_refused_in_one_line(folder):
    """A reusing project's loader restored from another shard layout read the whole dataset on
    every rank (1 rank -> 2) or half of it (2 -> 1) without a word; one state loaded on every
    rank drew the same masks on all of them; a state of another pipeline graph was blamed on
    the data ("run mscn data scan"); a dict that is no loader state was a KeyError. Each is
    one line naming its cause now, and a state of the same layout still continues exactly."""
    import dataclasses

    from mscn.pipelines.loader import LoaderStateMismatch

    cfg = tiny_cfg(folder, "train.global_batch=8")
    one = build_train_loader(cfg)
    batches = iter(one)
    next(batches)
    state = one.state_dict()
    following = next(batches)
    for rank, world in ((0, 2), (1, 2)):
        with pytest.raises(LoaderStateMismatch, match=rf"saved by rank 0 of 1, this loader is rank {rank} of 2"):
            build_train_loader(cfg, rank=rank, world_size=world, state=state)
    rank0 = build_train_loader(cfg, rank=0, world_size=2)
    next(iter(rank0))
    with pytest.raises(LoaderStateMismatch, match="saved by rank 0 of 2, this loader is rank 1 of 2"):
        build_train_loader(cfg, rank=1, world_size=2, state=rank0.state_dict())
    with pytest.raises(LoaderStateMismatch, match="data.crop=rrc, this loader with window"):
        build_train_loader(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, crop="window")), state=state)
    with pytest.raises(LoaderStateMismatch, match="4 views, this loader 2"):
        build_train_loader(dataclasses.replace(cfg, views=cfg.views[:2]), state=state)
    # a graph no key tells apart (here: a state from before the views key): DALI's own refusal,
    # said as the state's, not as the data's ("run mscn data scan")
    old = {k: v for k, v in state.items() if k != "views"}
    with pytest.raises(LoaderStateMismatch, match="saved by another pipeline .*DALI: .*checkpoint") as e:
        next(iter(build_train_loader(dataclasses.replace(cfg, views=cfg.views[:2]), state=old)))
    assert "mscn data scan" not in str(e.value)
    for bad in ({"foo": 1}, {"ranks": [{"loader": state}]}, "state"):
        with pytest.raises(TypeError, match=r"state: expected a DaliLoader.state_dict\(\)"):
            build_train_loader(cfg, state=bad)
    again = build_train_loader(cfg, state=state)
    after = next(iter(again))
    assert torch.equal(after.index, following.index)
    assert all(torch.equal(a, b) for a, b in zip(after.views, following.views))


def test_a_loop_that_takes_exactly_an_epoch_leaves_the_next_epoch_whole(folder):
    """Code that caps its steps at ``len(loader)`` (``islice``, a ``break`` at the last batch)
    got every other epoch empty: DALI ends an epoch only when asked for one batch more, and the
    next loop met that end at once (the reuse probe: 5, 0, 5, 0 batches). It now yields the
    same stream as whole loops do; ``reset()``, for code written for DALI's iterators, changes
    nothing at an epoch's end and warns in the middle of one (as DALI's own)."""
    import itertools
    import warnings

    cfg = tiny_cfg(folder, "train.global_batch=8")
    whole, capped = build_train_loader(cfg), build_train_loader(cfg)
    n = len(whole)
    want = [epoch_indices(whole) for _ in range(3)]
    got = [[i for b in itertools.islice(capped, n) for i in b.index.tolist()] for _ in range(2)]
    capped.reset()  # at an epoch's end: the next loop starts the next epoch, as without it
    got.append(epoch_indices(capped))
    assert got == want and all(sorted(e) == list(range(48)) for e in got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capped.reset()  # after a whole loop: nothing pending, nothing said
    next(iter(capped))
    with pytest.warns(UserWarning, match=r"reset\(\) in the middle of an epoch changes nothing"):
        capped.reset()
    assert len(epoch_indices(capped)) == 48 - 8  # the epoch continued
    assert capped.batch_size == 8
    # restored from a state saved at an epoch's end (met, or not yet met), reset() takes no
    # batch: a state saved after it continues where the first loader would (a review found
    # one batch skipped)
    for cap in (None, n):
        first = build_train_loader(cfg)
        epoch_indices(first) if cap is None else list(itertools.islice(first, cap))
        state = first.state_dict()
        following = epoch_indices(first)
        again = build_train_loader(cfg, state=state)
        again.reset()
        assert epoch_indices(build_train_loader(cfg, state=again.state_dict())) == following, cap
        assert epoch_indices(again) == following, cap


def test_a_hand_built_loader_checks_the_state_its_pipeline_continues_from(folder):
    """The documented hand-built restore (``views_pipeline(..., checkpoint=...)``) went
    unchecked: one rank's state on rank 1 of 2 read the whole set there, and the ranks ran
    different numbers of steps. ``DaliLoader(..., state=state)`` checks it against the
    reader's shard (DALI's reader metadata), the views and the data, continues the masks'
    draws, and is needed for a pipeline built from a checkpoint."""
    from mscn.config import ViewCfg
    from mscn.pipelines import DaliLoader
    from mscn.pipelines.loader import LoaderStateMismatch, mask_fn_from_cfgs

    source = resolve_source(str(folder))
    views = [ViewCfg(), ViewCfg()]

    def loader(state=None, checkpoint=None, **shard):
        pipe = views_pipeline(source, views, image_size=32, highpass=None, device="cpu", batch_size=8,
                              num_threads=1, device_id=None, seed=3, reader_seed=5, enable_checkpointing=True,
                              checkpoint=checkpoint, **shard)
        return DaliLoader(pipe, source, 2, policy="drop", mask_fn=mask_fn_from_cfgs([v.mask for v in views], 7),
                          state=state)

    first = loader()
    batches = iter(first)
    next(batches)
    state = first.state_dict()
    assert state["shard"] == [0, 1]  # from the reader, though no Replay was given
    following = next(batches)
    dali = bytes(state["dali"].numpy())
    with pytest.raises(LoaderStateMismatch, match="saved by rank 0 of 1, this loader is rank 1 of 2"):
        loader(state, dali, shard_id=1, num_shards=2)
    with pytest.raises(ValueError, match=r"built from a checkpoint: pass the DaliLoader.state_dict\(\) it came from"):
        loader(None, dali)
    with pytest.raises(ValueError, match="the pipeline was built without it; build it with enable_checkpointing"):
        loader(state, None)
    with pytest.raises(ValueError, match="built from another checkpoint"):
        loader(state, bytes(loader().state_dict()["dali"].numpy()))
    again = loader(state, dali)
    after = next(iter(again))
    assert torch.equal(after.index, following.index)
    assert all(torch.equal(a, b) for a, b in zip(after.views, following.views))  # masks included
    assert again.state_dict()["runs"] == 2
