"""The `clipvis` command: one entry point with subcommands (infer, demo, evaluate, segment, evaluate-semseg).

Each subcommand lives in its own module `clipvis.cli.<name>` exposing
`add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from clipvis.errors import ClipvisError
from clipvis.memory import enable_huge_page_allocations

SUBCOMMANDS = {
    "infer": "segment and track the objects named by a vocabulary in a video",
    "demo": "run `infer` on a built-in synthetic clip (no downloads)",
    "evaluate": "video mask AP of a results.json against LV-VIS / YouTube-VIS ground truth",
    "segment": "training-free semantic segmentation (CLIPtrase) of an image, a folder of images or a video",
    "evaluate-semseg": "CLIPtrase on a semantic segmentation benchmark (VOC, Pascal Context, COCO, ADE), the paper's metric",
}

log = logging.getLogger("clipvis")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="clipvis", description="Open-vocabulary video instance segmentation (CLIP-VIS).")
    parser.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"clipvis.cli.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def setup_logging(debug: bool, quiet: bool) -> None:
    """Log to stderr: clipvis at DEBUG with --debug, WARNING with --quiet, INFO otherwise; other libraries at WARNING."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    # Other libraries (open_clip logs every tokenizer lookup at INFO) only speak up with --debug.
    root_level = logging.DEBUG if debug else logging.WARNING
    logging.basicConfig(level=root_level, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("clipvis").setLevel(level)


def main(argv: Optional[List[str]] = None) -> int:
    """Parse `argv`, run the subcommand, and turn user errors into one line on stderr and exit status 2."""
    enable_huge_page_allocations()  # before anything imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_logging(args.debug, args.quiet)
    try:
        return int(args.func(args) or 0)
    except ClipvisError as e:
        if args.debug:
            raise
        print(f"clipvis {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line, and how to see more
        if args.debug:
            raise
        print(f"clipvis {args.command}: unexpected error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
