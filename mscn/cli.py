"""The ``mscn`` command: ``mscn data ...``, ``mscn pretrain``, ``mscn eval ...``, ``mscn demo``,
``mscn ablate``.

Every user-fixable failure is an :class:`~mscn.errors.MscnError`;
:func:`~mscn.errors.run_cli` prints it as one line ``mscn: error: ...`` on stderr with
exit code 2, never as a traceback wall. ``MSCN_DEBUG=1`` shows the traceback.
"""
from __future__ import annotations

import argparse
import re
import sys

from mscn.errors import run_cli

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")  # key=value, as config overrides are written


def _pretrain(args: argparse.Namespace) -> int:
    from mscn.train.pretrain import main as pretrain_main

    return pretrain_main(args.rest)


def _demo(args: argparse.Namespace) -> int:
    from mscn.train.demo import main as demo_main

    return demo_main(args.rest)


def _ablate(args: argparse.Namespace) -> int:
    from mscn.train.ablate.cli import main as ablate_main

    return ablate_main(args.rest)


def _config_show(args: argparse.Namespace) -> None:
    import yaml

    from mscn.config import load_config, to_dict

    overrides = list(args.overrides)
    if overrides and not args.config and not _OVERRIDE.match(overrides[0]):
        # `mscn config demo`: a recipe first, as the help's examples name one
        args.config = overrides.pop(0)
    cfg = load_config(args.config, overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")


_PASSTHROUGH = {"pretrain": _pretrain, "demo": _demo, "ablate": _ablate}


def build_parser() -> argparse.ArgumentParser:
    from mscn import __version__

    parser = argparse.ArgumentParser(
        prog="mscn",
        description="Masked Siamese ConvNets: DALI input pipeline, Triton masks, SimCLR/BYOL pretraining.",
    )
    parser.add_argument("--version", action="version", version=f"mscn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from mscn.data.cli import add_data_commands

    add_data_commands(sub)

    # pretrain/demo/ablate own their argument parsing (also reachable as python -m ...), so
    # everything after the sub-command is handed over untouched, --help included.
    p = sub.add_parser("pretrain", add_help=False, help="SimCLR/BYOL + MSCN pretraining (see mscn pretrain --help)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_pretrain)
    p = sub.add_parser("demo", add_help=False,
                       help="synthesize the default dataset, pretrain, linear-probe vs random init (see --help)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    p = sub.add_parser("ablate", add_help=False,
                       help="the paper's ablations (masks x high-pass, ratio, grid, ...) with seeds (see --help)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_ablate)

    from mscn.train.eval.cli import add_eval_commands

    add_eval_commands(sub)

    p = sub.add_parser("config", help="print a resolved config (defaults <- YAML <- overrides)",
                       description="Print a resolved config: `mscn config demo train.global_batch=32` "
                       "(or --config demo).")
    p.add_argument("--config", default=None, help="YAML file or bundled recipe name (demo, simclr_r50_in1k, ...)")
    p.add_argument("overrides", nargs="*", metavar="[RECIPE] key=value",
                   help="a recipe (as --config) first, then key=value overrides, e.g. train.global_batch=256")
    p.set_defaults(func=_config_show)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line as a namespace (``func`` runs it); argparse's own exit on bad usage."""
    parser = build_parser()
    if argv and argv[0] in _PASSTHROUGH:
        # argparse.REMAINDER drops a leading option such as --help, so hand these over directly
        return argparse.Namespace(func=_PASSTHROUGH[argv[0]], rest=argv[1:])
    # key=value overrides on both sides of an option (mscn eval knn a=1 --ckpt X b=2):
    # argparse has no intermixed parsing under sub-commands, and leaves the second group over
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not (hasattr(args, "overrides") and _OVERRIDE.match(a))]
    if stray:  # told by the sub-command's parser: its usage line names it and its options
        _command_parser(parser, argv).error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the sub-command ``argv`` names (``mscn eval knn`` -> knn's), else ``parser``."""
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and token in subs[0].choices:
            parser = subs[0].choices[token]
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: args.func(args), "mscn")

if __name__ == "__main__":
    sys.exit(main())
