"""The pipeline builders' arguments, checked before DALI traces the graph.

``views_pipeline`` and ``eval_pipeline`` are public: other SSL projects call them with
arguments of their own rather than a YAML recipe. DALI checks its operators' arguments
only when the pipeline runs, and then reports them as an assertion inside an operator
(or a negative shard id crashes the process), so each argument is checked here first,
with one line naming it. The ranges are the config schema's (mscn.config_checks).
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers


import torch

from mscn.config import MaskCfg, ViewCfg, is_integer, typed, validate_view
from mscn.config_checks import UNIT_SCALE, on_unit_scale
from mscn.data.source import Source

DEVICES = ("cpu", "gpu")
VIEW_DTYPES = ("float32", "float16")


def check_placement(rank, world_size, local_rank, device) -> None:
    """One line for a rank, world size or device this process cannot be (DALI would assert,
    or crash on a negative shard id, from deep inside the pipeline)."""
    for name, v in (("rank", rank), ("world_size", world_size), ("local_rank", local_rank)):
        if not is_integer(v):
            hint = f" (int(os.environ[{name.upper()!r}]))" if isinstance(v, str) else ""
            raise ValueError(f"{name}: expected an integer, got {v!r}{hint}")
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"rank {rank} of world_size {world_size} (local_rank {local_rank}): need "
                         "world_size >= 1, 0 <= rank < world_size and local_rank >= 0")
    if device is None:
        return
    if isinstance(device, str) and device.split(":")[0].strip().lower() in ("gpu", "mixed"):
        # DALI's own names for its backends; the builders take where the *batch* should live
        raise ValueError(f"device: {device!r} is DALI's name; the loader builders take a torch device: "
                         "'cuda' (or 'cuda:N') for the GPU pipeline, None or 'cpu' for the CPU one")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev}: CUDA is not available on this machine; pass device=None (or 'cpu') "
                             "for DALI's CPU pipeline")
        index = dev.index if dev.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} (local_rank {local_rank}): this machine has "
                             f"{torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {dev}: DALI's pipelines run on 'cuda' or 'cpu'")


def check_source(source) -> None:
    if not isinstance(source, Source):
        hint = " (mscn.pipelines.resolve_source(path) makes one)" if isinstance(source, str) or hasattr(
            source, "__fspath__") else ""
        raise TypeError(f"source: expected a mscn Source, got {type(source).__name__}{hint}")


def check_common(*, image_size, mean, std, highpass, device, view_dtype, shard_id, num_shards) -> None:
    """The arguments both pipelines take."""
    if device not in DEVICES:
        hint = " ('gpu' for a CUDA pipeline)" if str(device).startswith("cuda") else ""
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}{hint}")
    if view_dtype not in VIEW_DTYPES:
        raise ValueError(f"view_dtype: expected one of {', '.join(VIEW_DTYPES)} (DALI's output type of the views), "
                         f"got {view_dtype!r}")
    if not is_integer(image_size) or image_size < 8:
        raise ValueError(f"image_size: expected an integer >= 8, got {image_size!r}")
    for name, v in (("mean", mean), ("std", std)):
        if (isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 3
                or not all(isinstance(c, numbers.Real) and math.isfinite(c) for c in v)):
            raise ValueError(f"{name}: expected 3 numbers (R, G, B on the 0-255 scale), got {v!r}")
    if min(std) <= 0:
        raise ValueError(f"std: must be > 0, got {tuple(std)}")
    if on_unit_scale(mean, std):
        raise ValueError(f"std {tuple(std)} {UNIT_SCALE}")
    check_highpass(highpass)
    if not (is_integer(shard_id) and is_integer(num_shards) and num_shards >= 1 and 0 <= shard_id < num_shards):
        raise ValueError(f"shard_id {shard_id!r} of num_shards {num_shards!r}: need integers with "
                         "0 <= shard_id < num_shards")


def check_highpass(highpass) -> None:
    """``highpass``: (σ > 0, odd window >= 3) or None, for the pipelines and for
    ``DaliLoader`` (which high-passes on the CPU path): σ 0 divides by zero into NaN views,
    a window of 1 gives views of zeros, an even one fails only at the first batch."""
    if highpass is None:
        return
    ok = (isinstance(highpass, (list, tuple)) and len(highpass) == 2 and isinstance(highpass[0], numbers.Real)
          and not isinstance(highpass[0], bool) and math.isfinite(highpass[0]) and highpass[0] > 0
          and is_integer(highpass[1]) and highpass[1] >= 3 and highpass[1] % 2 == 1)
    if not ok:
        raise ValueError(f"highpass: expected (sigma > 0, odd window >= 3) or None, got {highpass!r} "
                         "(mscn.highpass.highpass_params(cfg.highpass) gives the recipe's)")


def check_views(views) -> list[ViewCfg]:
    """``views`` as ViewCfgs of the schema's types and ranges (a dict of ViewCfg keys is taken
    too); a MaskCfg where a view belongs is named."""
    if not isinstance(views, (list, tuple)) or not views:
        raise ValueError(f"views: expected a non-empty list of mscn.config.ViewCfg, got {views!r}")
    out = []
    for i, v in enumerate(views):
        if isinstance(v, MaskCfg):
            raise TypeError(f"views[{i}]: a MaskCfg; a view is ViewCfg(..., mask=MaskCfg(...))")
        v = typed(v, ViewCfg, "views", f"views[{i}]")
        # image_size None: the masks are the loader's (or the caller's), not this pipeline's
        validate_view(v, "views", f"views[{i}]", None)
        out.append(v)
    return out


COMMON = ("image_size", "mean", "std", "highpass", "device", "view_dtype", "shard_id", "num_shards")


def checked_args(graph):
    """``graph`` (a ``@pipeline_def`` function) with its arguments checked and made plain
    Python values (numpy's numbers and arrays included) before it is called. Outside the
    graph on purpose: DALI's conditionals (autograph) wrap whatever the graph function
    raises into a paragraph of its own."""
    sig = inspect.signature(graph)

    @functools.wraps(graph)
    def build(source, *args, **kwargs):
        check_source(source)
        # DALI builds a pipeline without them and fails later, when its iterator runs (a raw
        # "'<' not supported between NoneType and int" for num_threads)
        for name in ("batch_size", "num_threads"):
            value = kwargs.get(name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name}: a pipeline argument, expected an integer >= 1, got {value!r} "
                                 f"({graph.__name__}(source, ..., batch_size=.., num_threads=.., device_id=.., seed=..))")
        given = {k: kwargs.get(k, sig.parameters[k].default) for k in COMMON}
        check_common(**given)
        if given["device"] == "gpu" and kwargs.get("device_id") is None:
            # DALI would build it and fail at the first batch, or say "CUDA is not available"
            # and advise device_id=None, which this pipeline already has
            raise ValueError(f"device='gpu' needs device_id (the GPU's index, e.g. the local rank); device_id=None "
                             f"is DALI's CPU-only pipeline: pass device='cpu' with it "
                             f"({graph.__name__}(source, ..., device=.., device_id=..))")
        plain = {"image_size": int(given["image_size"]), "shard_id": int(given["shard_id"]),
                 "num_shards": int(given["num_shards"]), "mean": tuple(float(c) for c in given["mean"]),
                 "std": tuple(float(c) for c in given["std"])}
        if given["highpass"] is not None:
            plain["highpass"] = (float(given["highpass"][0]), int(given["highpass"][1]))
        if "resize" in sig.parameters:
            resize = kwargs.get("resize", sig.parameters["resize"].default)
            if not is_integer(resize) or resize < plain["image_size"]:
                raise ValueError(f"resize: expected an integer >= image_size ({plain['image_size']}), got {resize!r}")
            plain["resize"] = int(resize)
        if "reader_seed" in sig.parameters and kwargs.get("reader_seed", -1) == -1 and is_integer(kwargs.get("seed")) \
                and kwargs["seed"] >= 0:
            # DALI's reader takes -1 as a fixed seed of its own, not the pipeline's: every
            # seed= would read the same order (the augmentations alone changed)
            plain["reader_seed"] = int(kwargs["seed"])
        shuffled = kwargs.get("shuffle", sig.parameters["shuffle"].default) if "shuffle" in sig.parameters else False
        if "shuffle_buffer" in sig.parameters and shuffled:  # DALI's shuffling reader segfaults on 0 or -1
            value = kwargs.get("shuffle_buffer", sig.parameters["shuffle_buffer"].default)
            if not is_integer(value) or value < 1:
                raise ValueError(f"shuffle_buffer: expected an integer >= 1 (the reader's initial_fill), got {value!r}")
        if "crop" in sig.parameters:  # else a paragraph of DALI's autograph from inside the graph
            value = kwargs.get("crop", sig.parameters["crop"].default)
            if value not in (None, "rrc", "window"):
                raise ValueError(f"crop: expected 'rrc', 'window' or None (data.crop), got {value!r}")
        if "views" in sig.parameters:  # the views come second, by position or by name
            if args:
                args = (check_views(args[0]), *args[1:])
            elif "views" in kwargs:
                kwargs["views"] = check_views(kwargs["views"])
        return graph(source, *args, **{**kwargs, **plain})

    return build
