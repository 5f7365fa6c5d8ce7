"""DaliLoader's hold on DALI's outputs: each batch's are kept until the GPU has done the
adapter's reads of them (an event, ``_retire``), and ``hold`` keeps the last batches' whatever
the event says (the bench's masks-hold feed, which asks whether handing the buffers back
waits for the trainer's kernels)."""
import pytest
import torch
from pipeline_fixtures import make_folder, tiny_cfg

from mscn.pipelines import build_train_loader
from mscn.pipelines.loader import MAX_PENDING


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("hold"), classes=2, per_class=8)  # 16 images


def test_holding_outputs_changes_no_batch_and_holds_exactly_that_many(folder):
    cfg = tiny_cfg(folder, "train.global_batch=4")
    plain, held = build_train_loader(cfg), build_train_loader(cfg)
    held.hold(2)
    seen = []
    for n, (a, b) in enumerate(zip(plain, held), 1):  # one epoch: 4 batches
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views)) and torch.equal(a.labels, b.labels)
        seen.append((len(plain._held), len(held._held)))
    # on the CPU there is no event to wait for: the default keeps nothing, hold(2) the last two
    assert n == 4 and seen == [(0, 1), (0, 2), (0, 2), (0, 2)]
    held.reset()  # meets the epoch's end (zip stopped at plain's), which lets go of every held batch
    assert len(held._held) == 0
    assert held.state_dict()["runs"] == plain.state_dict()["runs"] == 4  # the checkpoint is DALI's, unchanged
    with pytest.raises(ValueError, match="hold"):
        held.hold(-1)


class Event:
    """Stands in for a CUDA event in the release rule (the rule, not CUDA, is under test)."""

    def __init__(self, done=False):
        self.done, self.waited = done, False

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = self.done = True


def test_outputs_go_back_only_after_their_event_oldest_first_and_bounded(folder):
    loader = build_train_loader(tiny_cfg(folder, "train.global_batch=4"))
    events = [Event() for _ in range(MAX_PENDING + 2)]
    for n, ev in enumerate(events[:3]):
        loader._retire(f"batch{n}", ev)
    assert [d for d, _ in loader._held] == ["batch0", "batch1", "batch2"]  # none has passed: all kept
    events[1].done = True
    loader._retire("batch3", events[3])
    assert len(loader._held) == 4  # batch1 is done but batch0 is not: they go back in order
    events[0].done = True
    loader._retire("batch4", events[4])
    assert [d for d, _ in loader._held] == ["batch2", "batch3", "batch4"]
    later = [Event() for _ in range(MAX_PENDING)]
    for n, ev in enumerate(later, 5):  # the GPU falls behind: the host waits for the oldest, no more
        loader._retire(f"batch{n}", ev)
        assert len(loader._held) <= MAX_PENDING
    assert [d for d, _ in loader._held] == [f"batch{n}" for n in range(5, 5 + MAX_PENDING)]
    assert events[2].waited and events[3].waited and events[4].waited and not any(e.waited for e in later)
    loader._retire(None, None)  # an epoch's end waits for every event and keeps nothing
    assert len(loader._held) == 0 and all(e.waited for e in later)
    loader._retire("done", Event(done=True))
    assert len(loader._held) == 0  # its reads are done: back to DALI at once
    loader.hold(1)
    loader._retire("a", Event(done=True))
    loader._retire("b", Event(done=True))
    assert [d for d, _ in loader._held] == ["b"]  # the last batch's, whatever its event says


def test_handover_is_checked(folder):
    from mscn.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.handover"):
        validate(tiny_cfg(folder, "data.handover=side"), "<test>")
    loader = build_train_loader(tiny_cfg(folder, "train.global_batch=4", "data.handover=private"))
    assert loader.handover == "private"
    # DALI's CPU path has no stream to hand over on: the same batches as the default
    plain = build_train_loader(tiny_cfg(folder, "train.global_batch=4"))
    for a, b in zip(plain, loader):
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))


def test_private_handover_refuses_the_legacy_executor_when_built(folder):
    """The private stream is safe only where share_outputs waits for the batch on the host
    (DALI's default executor): a GPU pipeline on the legacy one is refused by the loader's
    constructor, before DALI builds anything (so this runs without a GPU: it is never built)."""
    from nvidia.dali import fn, pipeline_def

    from mscn.data.source import resolve_source
    from mscn.pipelines.loader import DaliLoader, LastBatchPolicy

    @pipeline_def
    def legacy():
        return fn.random.uniform(range=[0.0, 1.0])

    pipe = legacy(batch_size=2, num_threads=1, device_id=0, exec_dynamic=False, exec_async=False,
                  exec_pipelined=False)
    with pytest.raises(ValueError, match="exec_dynamic"):
        DaliLoader(pipe, resolve_source(str(folder)), 1, policy=LastBatchPolicy.DROP, handover="private")


def test_a_dropped_loader_waits_for_the_reads_of_what_it_holds(folder):
    """A run that stops mid-epoch drops its loader: the outputs it holds go back to DALI's
    pool (which outlives the loader) only after their events."""
    loader = build_train_loader(tiny_cfg(folder, "train.global_batch=4"))
    events = [Event(), Event(done=True), Event()]
    for n, ev in enumerate(events):
        loader._held.append((f"batch{n}", ev))
    del loader
    assert events[0].waited and events[2].waited and not events[1].waited
