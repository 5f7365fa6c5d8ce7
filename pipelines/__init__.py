"""mscn.pipelines: the MSCN input pipeline (DALI): decode -> views -> high-pass -> masks.

Public API (docs/PIPELINE.md has a reuse example without the mscn trainer):

- ``build_train_loader(cfg, rank, world_size, local_rank, device, apply_mask)`` and
  ``build_eval_loader(cfg, root, ...)``: config -> :class:`DaliLoader` of :class:`MscnBatch`.
- ``views_pipeline`` / ``eval_pipeline``: the DALI ``@pipeline_def`` functions, for
  your own view list; ``resolve_source`` turns a path into their ``Source``;
  ``output_names`` lists their outputs.
- ``DaliLoader(pipeline, source, num_views, policy=...)``: the adapter to torch.
- ``build_reference_loader``: the torchvision/PIL equivalent (baseline, tests).

The names are imported on first use (PEP 562), so ``import mscn.pipelines.tuning``
does not load DALI.
"""
import importlib

_EXPORTS = {
    "DaliLoader": "loader", "MscnBatch": "loader", "build_train_loader": "loader",
    "build_eval_loader": "loader", "linear_probe_view": "loader", "mask_fn_from_cfgs": "loader",
    "rank_seed": "loader", "endless": "loader", "views_pipeline": "train_pipeline", "output_names": "train_pipeline",
    "FLAG_NAMES": "train_pipeline", "eval_pipeline": "eval_pipeline", "resolve_source": "readers",
    "Source": "readers", "READER_NAME": "readers", "ShardDriftWarning": "readers",
    "build_reference_loader": "reference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mscn.pipelines' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mscn.pipelines.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return __all__
