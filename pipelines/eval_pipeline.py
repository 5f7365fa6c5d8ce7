"""The evaluation pipeline: resize the shorter side, center-crop, normalize, high-pass.

Paper App. A.2: "At test time, we resize the image to 256x256 and center-crop it to a
size of 224x224 and followed by a High-pass filter" — resize means the shorter side
(``data.val_resize``), as in the torchvision recipes A.2 follows. The high-pass must
be the one used in pretraining (σ and window), applied the same way (§5.1).

Reading is unshuffled and each rank sticks to its shard, so an evaluation pass reads
every sample exactly once across ranks (under the PARTIAL last-batch policy).
Outputs: ``view0``, then ``label`` (tar shards only) and ``index``, as in
:func:`mscn.pipelines.train_pipeline.output_names`.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def

from mscn.config import IMAGENET_MEAN, IMAGENET_STD
from mscn.pipelines.args import checked_args
from mscn.pipelines.ops import decode, normalize_highpass
from mscn.pipelines.readers import Source, read


@checked_args  # its arguments, before DALI traces the graph (pipelines/args.py)
@pipeline_def
def eval_pipeline(source: Source, *, image_size: int = 224, resize: int = 256, mean=IMAGENET_MEAN,
                  std=IMAGENET_STD, highpass: tuple[float, int] | None = (5.0, 31), device: str = "cpu",
                  hw_decoder_load: float = 0.65, shard_id: int = 0, num_shards: int = 1,
                  reader_seed: int = -1, view_dtype: str = "float32"):
    """The evaluation view of paper App. A.2: resize the shorter side to ``resize``,
    center-crop ``image_size``, normalize and high-pass (§5.1).

    Returns a DALI pipeline whose outputs are the view (CHW), then the label and the
    sample index where ``source`` has them; pipeline arguments as for ``views_pipeline``."""
    encoded, label, index = read(source, shard_id=shard_id, num_shards=num_shards, shuffle=False,
                                 shuffle_buffer=1, stick_to_shard=True, seed=reader_seed)
    images = decode(encoded, device, hw_decoder_load)
    images = fn.resize(images, resize_shorter=resize, antialias=True)
    # the center crop happens in the normalize pass (crop_mirror_normalize)
    outputs = [normalize_highpass(images, mean, std, 0, highpass, view_dtype, crop=image_size)]
    if label is not None:
        outputs.append(label)
    if index is not None:
        outputs.append(index)
    return tuple(outputs)
