"""The MSCN training pipeline: read -> decode once -> N views -> normalize -> high-pass.

Paper §5.2 ("Multicrops": 2 main + 2 extra views) and App. A.1 (SimCLR/BYOL
augmentations, per view); the high-pass after normalization is §5.1. Masks are not
applied here: the loader applies them to the output tensors (cuda_kernels/).

Outputs, in order (see :func:`output_names`): ``view0 .. view{N-1}`` (CHW, float),
then ``label`` when the reader carries labels (tar shards), then ``index``; a view whose
blur the loader applies (``data.blur_where=loader``) adds ``view{i}_sigma`` (float, 0 where
not blurred), one whose colour it applies (``data.colour_where=loader``) is the cropped
uint8 HWC image, unflipped, and adds ``view{i}_colour`` instead (float, (10,) uniforms:
mscn.colour.DRAWS; its blur's σ is drawn there too); with ``debug_outputs`` each view
adds ``view{i}_flags`` (int32: flip, jitter, gray, blur, solarize) and ``view{i}_area``
(crop area fraction), for tests and statistics.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from mscn.config import IMAGENET_MEAN, IMAGENET_STD, ViewCfg
from mscn.pipelines.args import checked_args
from mscn.pipelines.ops import augment_view, blur_deferred, colour_deferred, decode, normalize_highpass
from mscn.pipelines.readers import Source, read

FLAG_NAMES = ("flip", "jitter", "gray", "blur", "solarize")


def deferred_views(views: list[ViewCfg], blur_in_loader: bool) -> tuple[int, ...]:
    """Indices of the views whose blur the loader applies (ops.blur_deferred)."""
    return tuple(i for i, v in enumerate(views) if blur_deferred(v, blur_in_loader))


def coloured_views(views: list[ViewCfg], blur_in_loader: bool, colour_in_loader: bool) -> tuple[int, ...]:
    """Indices of the views whose colour jitter and grayscale the loader applies (ops.colour_deferred)."""
    return tuple(i for i, v in enumerate(views) if colour_deferred(v, blur_in_loader, colour_in_loader))


def loader_blurred(views: list[ViewCfg], blur_in_loader: bool, colour_in_loader: bool) -> tuple[int, ...]:
    """Indices of every view whose blur the loader applies: those of :func:`deferred_views`,
    and the coloured views that blur (their blur moves with their colour, also where a
    solarize follows it: it moves too)."""
    coloured = coloured_views(views, blur_in_loader, colour_in_loader)
    return tuple(i for i, v in enumerate(views)
                 if blur_deferred(v, blur_in_loader) or (i in coloured and v.blur_prob > 0))


def output_names(num_views: int, source: Source, debug_outputs: bool = False,
                 deferred: tuple[int, ...] = (), coloured: tuple[int, ...] = ()) -> list[str]:
    """Names of the pipeline's outputs, matching what :func:`views_pipeline` returns;
    ``deferred``: the views with a ``view{i}_sigma`` output (:func:`deferred_views`),
    ``coloured``: those with a ``view{i}_colour`` output (:func:`coloured_views`)."""
    names = []
    for i in range(num_views):
        names.append(f"view{i}")
        if i in deferred and i not in coloured:  # a coloured view's σ comes from its draws
            names.append(f"view{i}_sigma")
        if i in coloured:
            names.append(f"view{i}_colour")
        if debug_outputs:
            names += [f"view{i}_flags", f"view{i}_area"]
    if source.label_in_stream:
        names.append("label")
    if source.has_index:
        names.append("index")
    return names


@checked_args  # its arguments, before DALI traces the graph (pipelines/args.py)
@pipeline_def(enable_conditionals=True)
def views_pipeline(source: Source, views: list[ViewCfg], *, image_size: int = 224, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, highpass: tuple[float, int] | None = (5.0, 31), device: str = "cpu",
                   hw_decoder_load: float = 0.65, shard_id: int = 0, num_shards: int = 1,
                   shuffle: bool = True, shuffle_buffer: int = 4096, reader_seed: int = -1, even_shards: bool = True,
                   view_dtype: str = "float32", debug_outputs: bool = False, crop: str | None = None,
                   blur_in_loader: bool = False, colour_in_loader: bool = False):
    """N augmented views of every image, each with its own :class:`ViewCfg` (paper App. A.1's
    augmentations, then §5.1's high-pass; the masks follow in the loader, §5.3).

    Returns a DALI pipeline whose outputs are named by :func:`output_names`: one CHW view
    per ViewCfg, then the label and index where the source has them.

    Call with the pipeline arguments too: ``views_pipeline(src, views, batch_size=..,
    num_threads=.., device_id=.. (None on the CPU path), seed=.., prefetch_queue_depth=..)``.
    ``device``: "gpu" decodes with ``device="mixed"`` and runs every image op on the GPU
    (needs a ``device_id``); "cpu" runs everything on DALI's CPU threads.
    ``highpass``: (σ, window), or None to leave it out (ablation, or when the caller
    applies it after the pipeline, as the CPU path of the loader does).
    ``reader_seed`` fixes the reader's shuffle (-1: the pipeline's ``seed``; diagnose.py replays it); ``even_shards``:
    shards of one size (``readers.read``; False only to continue an older loader state); ``view_dtype``
    is float32 or float16 (the DALI output type of the views). ``crop``: "rrc" or
    "window" (``data.crop``, ops.resized_crop); None: "rrc", or "window" with ``debug_outputs``.
    ``blur_in_loader`` (``data.blur_where=loader``): the views of :func:`deferred_views` are
    not blurred here but hand their σ to the loader, which blurs and then high-passes them,
    so ``highpass`` must then be None (the high-pass must see the blurred view).
    ``colour_in_loader`` (``data.colour_where=loader``): the views of :func:`coloured_views`
    leave DALI as the crops themselves (uint8 HWC) with one draw of ten uniforms each, and
    the loader flips, colours, normalizes, blurs and high-passes them (``highpass`` None here too).
    """
    deferred = deferred_views(views, blur_in_loader)
    coloured = coloured_views(views, blur_in_loader, colour_in_loader)
    blurred = loader_blurred(views, blur_in_loader, colour_in_loader)
    if (deferred or coloured) and highpass is not None:
        raise ValueError("blur_in_loader / colour_in_loader: the loader changes views after DALI, so the "
                         "high-pass must run there too (highpass=None here)")
    encoded, label, index = read(source, shard_id=shard_id, num_shards=num_shards, shuffle=shuffle,
                                 shuffle_buffer=shuffle_buffer, stick_to_shard=False, seed=reader_seed,
                                 even_shards=even_shards)
    # the "window" crop draws its windows from the image size on the CPU; peeking at the
    # header avoids waiting for the (possibly GPU) decoder (DALI prunes it for "rrc")
    shape = fn.peek_image_shape(encoded)
    images = decode(encoded, device, hw_decoder_load)  # once per image, shared by all views
    # the debug outputs report each crop's area, which only the "window" crop exposes (the
    # same rule as the fused op: tests/test_pipeline_crop.py)
    crop_op = crop or ("window" if debug_outputs else "rrc")
    if debug_outputs and crop_op == "rrc":
        raise ValueError("debug outputs report the crop window, which crop='rrc' does not expose")
    outputs = []
    for i, view in enumerate(views):  # trace time: one branch of the graph per view
        x, flags = augment_view(images, shape, view, image_size, crop_op, defer_blur=i in blurred,
                                defer_colour=i in coloured)
        if i in coloured:  # the crop as it is: the loader's kernel flips, colours, normalizes and transposes it
            outputs.append(x)
        else:
            outputs.append(normalize_highpass(x, mean, std, fn.cast(flags.flip, dtype=types.INT32), highpass,
                                              view_dtype))
        if i in deferred and i not in coloured:  # on the views' device: the loader builds its matrices there
            outputs.append(flags.blur_sigma.gpu() if device == "gpu" else flags.blur_sigma)
        if i in coloured:  # likewise: the colour kernel reads the draws on the device (σ included)
            outputs.append(flags.colour.gpu() if device == "gpu" else flags.colour)
        if debug_outputs:
            drawn = [getattr(flags, name) for name in FLAG_NAMES]
            outputs.append(fn.stack(*[fn.cast(f, dtype=types.INT32) for f in drawn]))
            outputs.append(flags.crop_area)
    if label is not None:
        outputs.append(label)
    if index is not None:
        outputs.append(index)
    return tuple(outputs)
