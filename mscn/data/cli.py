"""The `mscn data ...` sub-commands: synth, photos, scan, subset, pack.

``mscn/cli.py`` calls :func:`add_data_commands` on its sub-parsers and then
``args.func(args)``; every failure is an MscnError that ``run_cli`` prints as one
line. ``python -m mscn.data.cli data ...`` runs the same commands on their own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mscn.errors import MscnError, run_cli


def parse_size(text: str) -> tuple[int, int]:
    """``"500x375"`` -> ``(500, 375)`` (width x height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 500x375, got {text!r}") from None
    # JPEG stops at 65,535 px a side, and memory well before (a 100000x100000 image is 30 GB)
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"each side must be 1..{MAX_SIDE} px, got {text!r}")
    return w, h


MAX_SIDE = 8192


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a process count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _synth(args) -> None:
    from mscn.data.synth import synthesize

    s = synthesize(args.out, args.classes, args.per_class, size=args.size, seed=args.seed,
                   workers=args.workers, val_per_class=args.val_per_class)
    verb = "already there (same parameters), skipped" if s["skipped"] else f"written in {s['seconds']} s"
    print(f"synth: {s['num_train']} train + {s['num_val']} val images, {len(s['classes'])} classes, "
          f"{verb}: {s['out']}")
    print(f"synth: JPEG sizes min/median/max {s['kb_min']}/{s['kb_median']}/{s['kb_max']} KB, "
          f"{s['images_per_s']} images/s")


def _photos(args) -> None:
    from mscn.data.photos import make_photos

    s = make_photos(args.out, per_class=args.per_class, size=args.size, seed=args.seed,
                    val_fraction=args.val_fraction)
    verb = "already there (same parameters), skipped" if s["skipped"] else f"written in {s['seconds']} s"
    print(f"photos: {s['num_train']} train + {s['num_val']} val crops, {len(s['classes'])} classes (one per "
          f"photo), {verb}: {s['out']}")
    print(f"photos: val crops come from {s['val_tiles']} of each photo's {s['tiles']} tiles, train crops from "
          f"the other {s['tiles'] - s['val_tiles']}; sources and licences in {s['out']}/photos.json")
    print(f"photos: JPEG sizes min/median/max {s['kb_min']}/{s['kb_median']}/{s['kb_max']} KB, "
          f"{s['images_per_s']} images/s")


SHOWN = 10  # excluded files named on the terminal after a scan


def _scan(args) -> None:
    from mscn.data.imagefolder import printable
    from mscn.data.scan import default_outputs, report_path_for, scan

    out, _ = default_outputs(args.root)
    out = args.out or out
    report = args.report or report_path_for(out)  # beside the list: the readers look there for its root
    r = scan(args.root, out=out, report=report,
             min_size=args.min_size, workers=args.workers)
    bad = {k: v for k, v in r["counts"].items() if v and k != "ok"}
    what = f"{len(r['classes'])} classes" if r["classes"] else "no classes (a flat folder: the list is unlabelled)"
    print(f"scan: {r['num_files']} files, {what}: kept {r['num_kept']}, "
          f"excluded {r['num_excluded']}; issues {json.dumps(bad) if bad else 'none'}")
    for c in r.get("empty_classes", [])[:SHOWN]:
        print(f"scan: note: class folder {Path(args.root) / c} holds no usable image; it still takes a label")
    excluded = [i for i in r["issues"] if i["excluded"]]
    for i in excluded[:SHOWN]:  # the files a user goes to fix first; all of them are in the report
        print(f"scan: excluded {printable(str(Path(args.root) / i['path']))}: {i['reason']} ({i['detail']})")
    if len(excluded) > SHOWN:
        print(f"scan: ... and {len(excluded) - SHOWN} more excluded, each named in the report")
    print(f"scan: file list -> {out}")
    print(f"scan: report    -> {report}")
    beside = report_path_for(out)
    if Path(report).resolve() != beside.resolve():  # the readers find the list's image root there only
        print(f"scan: note: to train from {out}, its report must be beside it as {beside} (the readers take "
              f"the images' root from there): copy {report} there")


def _subset(args) -> None:
    from mscn.data.subset import default_subset_path, make_subset

    if args.official is None and args.fraction is None:
        raise MscnError("subset: give --fraction (e.g. 0.01) or --official FILE")
    out = args.out or default_subset_path(args.root, args.fraction, args.seed, args.official)
    chosen = make_subset(args.root, args.fraction, seed=args.seed, out=out, official=args.official)
    print(f"subset: {len(chosen)} images, {len({label for _, label in chosen})} classes -> {out}")


def _pack(args) -> None:
    from mscn.data.pack import pack_command  # imported only when used

    pack_command(args)


def _index(args) -> int:
    from mscn.data.index import index_command

    return index_command(args)


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` and its sub-commands on an ``add_subparsers()`` object."""
    data = subparsers.add_parser("data", help="dataset tools: synth, photos, scan, subset, pack, index",
                                 description="Dataset tools: make, check, subset and pack image folders.")
    sub = data.add_subparsers(dest="data_command", metavar="{synth,photos,scan,subset,pack,index}", required=True)

    p = sub.add_parser("synth", help="write a synthetic ImageFolder with learnable classes",
                       description="Write OUT/train/<class>/<idx>.jpg (and OUT/val/...): each class is a shape x "
                       "texture family drawn at random colour, position, scale and rotation among distractors, "
                       "at ImageNet resolution and JPEG size. Same seed -> identical files; re-running with the "
                       "same parameters is a no-op.")
    p.add_argument("out", metavar="OUT", help="output folder (created; must be empty or an earlier synth output)")
    p.add_argument("--classes", metavar="K", type=int, required=True, help="number of classes (1..1000)")
    p.add_argument("--per-class", metavar="N", type=int, required=True, help="training images per class")
    p.add_argument("--val-per-class", metavar="M", type=int, default=0,
                   help="validation images per class (default 0: no val split)")
    p.add_argument("--size", metavar="WxH", type=parse_size, default=(500, 375),
                   help="image width x height (default 500x375)")
    p.add_argument("--seed", metavar="S", type=int, default=0,
                   help="random seed; each image is seeded from (seed, split, class, index) (default 0)")
    p.add_argument("--workers", metavar="W", type=positive_int, default=None, help="processes (default: every core this process may use)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("photos", help="write an ImageFolder of crops of real photos (one class per photo)",
                       description="Write OUT/train/<class>/<idx>.jpg and OUT/val/...: each class is one of 10 "
                       "colour photos that ship inside scikit-image and scikit-learn (no download; "
                       "pip install 'mscn[photos]'), each image a random crop of it resized to --size. Each photo "
                       "is cut into 4x4 tiles; val crops come from round(16 F) tiles picked by the seed, train "
                       "crops from the others, and no crop crosses a tile, so train and val share no pixel. "
                       "Same seed -> identical files; re-running with the same parameters is a no-op. "
                       "OUT/photos.json records the photos' sources and licences and every crop's box.")
    p.add_argument("out", metavar="OUT", help="output folder (created; must be empty or an earlier photos output)")
    p.add_argument("--per-class", metavar="N", type=int, default=200,
                   help="training crops per photo (default 200); val gets as many per tile")
    p.add_argument("--size", metavar="WxH", type=parse_size, default=(96, 96),
                   help="crop width x height (default 96x96: the demo's 64 px views are cut from it)")
    p.add_argument("--seed", metavar="S", type=int, default=0,
                   help="random seed of the tile split and of every crop (default 0)")
    p.add_argument("--val-fraction", metavar="F", type=float, default=0.25,
                   help="share of each photo's 16 tiles held out for val, rounded to whole tiles (default 0.25)")
    p.set_defaults(func=_photos)

    p = sub.add_parser("scan", help="decode every image, report bad files, write a file list",
                       description="Decode every file under the ImageFolder ROOT (or in a flat folder of unlabelled "
                       "images) with PIL; report corrupt, truncated, "
                       "zero-byte and non-image files (excluded from the list) and small (short side < 32 px), CMYK, "
                       "grayscale and non-JPEG files (kept: DALI decodes them to RGB, the crops upsample them). Writes a DALI file list 'relpath label' "
                       "(bare 'relpath' lines for a flat folder) and a JSON report; never writes inside ROOT.")
    p.add_argument("root", metavar="ROOT", help="ImageFolder root (ROOT/<class>/<image>) or a flat folder of images")
    p.add_argument("--out", metavar="FILE", default=None, help="file list to write (default: ./<name>.filelist.txt)")
    p.add_argument("--report", metavar="FILE", default=None,
                   help="JSON report to write (default: beside the file list, <list name>.scan.json, "
                        "where the readers take the images' root from)")
    p.add_argument("--min-size", metavar="PX", type=int, default=0,
                   help="also exclude images whose short side is smaller, reported as 'tiny' "
                        "(default 0: keep every decodable image; short sides < 32 are reported as 'small')")
    p.add_argument("--workers", metavar="W", type=positive_int, default=None, help="processes (default: every core this process may use)")
    p.set_defaults(func=_scan)

    p = sub.add_parser("subset", help="write a class-balanced label subset (1%%, 10%%)",
                       description="Write a deterministic class-balanced subset of ROOT as a file list "
                       "(round(fraction * n) images per class, at least 1), or convert an official ImageNet "
                       "subset file (one n01440764_10026.JPEG per line) with --official.")
    p.add_argument("root", metavar="ROOT", help="ImageFolder root (ROOT/<class>/<image>), or the file list of "
                   "`mscn data scan ROOT`: then only the files the scan kept are drawn")
    p.add_argument("--fraction", metavar="F", type=float, default=None, help="share of each class to keep, in (0, 1]")
    p.add_argument("--seed", metavar="S", type=int, default=0, help="random seed of the draw (default 0)")
    p.add_argument("--official", metavar="FILE", default=None, help="official subset file to convert instead")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="file list to write (default: ./<name>.subset<pct>pct.seed<seed>.txt)")
    p.set_defaults(func=_subset)

    p = sub.add_parser("pack", help="pack an ImageFolder or a scan file list into .tar shards",
                       description="Pack ROOT into webdataset-style .tar shards in OUT. ROOT is an ImageFolder "
                       "(ROOT/<class>/<image>), a flat folder of unlabelled images, or a file list such as the "
                       ".filelist.txt written by `mscn data scan` (its paths are relative to the scanned root). "
                       "Every image is decoded first (from a scan's list, only the files changed since that scan); "
                       "files that do not decode are skipped and listed "
                       "(--strict: refuse). OUT/sources.json maps every sample back to its source file.")
    p.add_argument("root", metavar="ROOT", help="ImageFolder root, flat image folder, or file list (.txt)")
    p.add_argument("out", metavar="OUT", help="output folder for the shards")
    p.add_argument("--shard-size", metavar="N", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--strict", action="store_true", help="refuse to pack if any file does not decode")
    p.add_argument("--workers", metavar="W", type=positive_int, default=None, help="decode-check processes (default: every core this process may use)")
    p.set_defaults(func=_pack)

    p = sub.add_parser("index", help="(re)write the DALI index (.idx) of every .tar shard in a folder",
                       description="Write the DALI v1.2 index beside every .tar in FOLDER (or of one .tar): for "
                       "webdataset shards mscn did not pack, or shards changed after indexing. Read with Python's "
                       "tarfile, so member names over 100 bytes get the right offsets (DALI's wds2idx places them "
                       "1,024 bytes early). An index that already fits is left as it is.")
    p.add_argument("folder", metavar="FOLDER", help="folder of .tar shards, or one .tar file")
    p.add_argument("--check", action="store_true",
                   help="write nothing: list the shards whose index is missing or does not fit (exit status 1)")
    p.set_defaults(func=_index)
    return data


def main(argv=None) -> int:
    """Stand-alone entry: ``python -m mscn.data.cli data scan ROOT``."""
    parser = argparse.ArgumentParser(prog="mscn")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args), "mscn")

if __name__ == "__main__":
    sys.exit(main())
