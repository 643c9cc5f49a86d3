"""``spade-faiss`` command line: the parser, and ``main`` (one-line errors, exit codes).

Exit status: 0 success; 1 error (one line on stderr naming the file or value and what to do);
3 finished but some inputs were skipped (each listed with its reason); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import warnings

from .. import __version__
from ..config import PARAM, PARAMETERS, check_int, check_number
from . import commands
from .allocator import keep_freed_memory
from .distributed import RAY_WORKERS

EXIT_ERROR = commands.EXIT_ERROR
EXIT_PARTIAL = commands.EXIT_PARTIAL


FEATURE_OPTIONS = tuple(p.name for p in PARAMETERS if p.cli == "features")
SCORING_OPTIONS = tuple(p.name for p in PARAMETERS if p.cli == "scoring")
INDEX_OPTIONS = tuple(p.name for p in PARAMETERS if p.cli == "index") + ("nprobe",)  # the tuned default's target
RUN_OPTIONS = tuple(p.name for p in PARAMETERS if p.cli == "run")
SERVICE_OPTIONS = tuple(p.name for p in PARAMETERS if p.cli == "service" and p.name not in ("host", "port"))


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (options without one say so in their help)."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _finite(name, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ValueError(f"{name}={value!r}: expected a finite number")


# The constraints of the command line's own options (those that are no parameter of the table,
# config.PARAMETERS, whose constraints are checked the same way): all checked in one place, before
# any command runs (``check_options``); tests/test_options.py tries each.
OPTION_CHECKS = {
    "threads": lambda n, v: v is None or check_int(n, v, 1, 4096),
    "ray_workers": lambda n, v: check_int(n, v, 1, 100_000),
    "gpus_per_worker": lambda n, v: check_number(n, v, 0.0, 1024.0),
    "shard_index": lambda n, v: check_int(n, v, 0),
    "num_shards": lambda n, v: check_int(n, v, 1),
    "hold_out": lambda n, v: check_number(n, v, 0.0, 0.99),
    "tau": _finite,
    "theta": _finite,
    "buffer": lambda n, v: check_int(n, v, 1, 10_000),
    "max_frames": lambda n, v: v is None or check_int(n, v, 1),
    "seconds": lambda n, v: v is None or check_number(n, v, 0.0, low_open=True),
    "metrics_port": lambda n, v: v is None or check_int(n, v, 1, 65535),
    "metrics_host": lambda n, v: PARAM["host"].check_value(v),
    "train_frames": lambda n, v: check_int(n, v, 1),
    "test_stride": lambda n, v: check_int(n, v, 1),
    "generation": lambda n, v: check_int(n, v, 1),
}


def check_options(args) -> None:
    """Every option given to a command, against its declared constraint (the table's for the
    parameters, ``OPTION_CHECKS`` for the command line's own): a ``ValueError`` naming the first
    value out of range, before any work."""
    for name, value in vars(args).items():
        if name in PARAM and not (value is None and PARAM[name].default is None):
            PARAM[name].check_value(value)
        elif name in OPTION_CHECKS:
            OPTION_CHECKS[name](name, value)


def _common(parser):
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what the library does (INFO level)")


def add_params(group, names, defaults: bool = True, note: str = ""):
    """Options for the Spade parameters ``names``, from their declaration (config.PARAMETERS):
    the help text, choices, type and default. ``defaults=False``: the option is absent unless
    given (an existing corpus keeps its own value; the table's default is still shown)."""
    for name in names:
        p = PARAM[name]
        kw = {"help": (p.help + note).replace("%", "%%"), "dest": name}  # argparse formats help with %
        if p.choices:
            kw["choices"] = list(p.choices)
        if p.cli_type:
            kw["type"] = p.cli_type
        if p.default is False:  # a switch
            kw["action"] = "store_true"
        if defaults:
            kw["default"] = p.default
        else:
            kw["default"] = argparse.SUPPRESS
            kw["help"] += f" (default: {'none' if p.default is None else p.default})"
        group.add_argument(p.flag, **kw)


def _input_args(p):
    add_params(p.add_argument_group("video inputs (which frames are items)"), ("frame_stride", "start_s", "end_s"))
    add_params(p.add_argument_group("tiles (high-resolution images: which tiles are items)"),
               ("tile", "tile_overlap"))


def _temporal_args(p):
    add_params(p.add_argument_group("video inputs (scores over time)"), ("temporal_sigma",))


def _feature_args(p):
    # No parser defaults: a new corpus gets the library's, an existing one keeps its own.
    g = p.add_argument_group("features (fixed for a corpus; an existing corpus keeps its own)")
    add_params(g, FEATURE_OPTIONS, defaults=False)
    g.add_argument("--dtype", dest="storage", choices=["float16", "float32"], default=argparse.SUPPRESS,
                   help="deprecated spelling of --storage float16|float32, kept for one release "
                        "(default: as --storage)")


def _model_args(p):
    g = p.add_argument_group("model (default: what the corpus was built with)")
    add_params(g, ("weights", "seed"), defaults=False,
               note="; overrides the corpus's own, which must be the same weights (checked by sha256)")


def _run_args(p):
    g = p.add_argument_group("run")
    add_params(g, RUN_OPTIONS)
    g.add_argument("--threads", type=int, help="torch threads of this process (default: all cores); on some "
                                               "CPUs the backbone's bits depend on the thread count, so runs "
                                               "that must match bit for bit use the same value")


def _index_args(p):
    add_params(p.add_argument_group("image index"), INDEX_OPTIONS)


def _scoring_args(p):
    add_params(p.add_argument_group("scoring (defaults are the paper's; docs/design.md, section 1)"),
               SCORING_OPTIONS)


class _Deprecated(argparse.Action):
    """An old spelling of an option, kept for one release: it warns and sets the new one."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"spade-faiss: warning: {option_string} is deprecated: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


BACKENDS = ("local", "ray")


def _backend_args(p):
    g = p.add_argument_group("execution backend")
    g.add_argument("--backend", default="local", choices=BACKENDS,
                   help="where the work runs: local (this process) or ray (a Ray cluster; needs the 'ray' extra)")
    g.add_argument("--engine", dest="backend", choices=BACKENDS, action=_Deprecated, new="--backend",
                   default=argparse.SUPPRESS,
                   help="deprecated spelling of --backend, removed in the next release (default: that of --backend)")
    g.add_argument("--ray-workers", type=int, default=RAY_WORKERS, help="Ray actors (--backend ray)")
    g.add_argument("--ray-address", help="join an existing Ray cluster (default: start a local one)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPU share of each Ray actor")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spade-faiss", formatter_class=_Formatter,
                                 description="SPADE anomaly detection over faiss-indexed HDF5 corpora. "
                                             "Scores: higher = more anomalous.")
    ap.add_argument("--version", action="version", version=__version__)
    _common(ap)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_, *groups):
        """A subcommand with the common options and the given option groups."""
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=_Formatter)
        _common(p)
        for group in groups:
            group(p)
        return p

    p = command("index", "index normal images into a corpus file (appends only images not yet in it)",
                _feature_args, _index_args, _run_args, _backend_args, _input_args)
    p.add_argument("src", help="a folder (images and videos), a text file of paths, a video file, or an MVTec "
                               "category (indexes train/good)")
    p.add_argument("--out", required=True, help="corpus file, e.g. indexes/NAME.h5 (created or appended to)")
    p.add_argument("--hold-out", type=float, default=0.0, metavar="FRACTION",
                   help="set aside about this fraction of the normals (a seeded choice per image, stable as the "
                        "set grows; listed in NAME.held_out.txt beside the corpus), index the rest and calibrate "
                        "on them: one command instead of index + calibrate (0: index every image)")
    add_params(p, ("fpr", "event_s"), note=" (with --hold-out)")

    p = command("remove", "remove normal images from a corpus (by path as indexed, or sha256): the corpus is "
                          "rewritten whole and its image index rebuilt; while it is read (a service), the removal is "
                          "recorded beside it, readers stop retrieving them at their next refresh, and the next "
                          "command with the corpus to itself rewrites it")
    p.add_argument("store", help="corpus file")
    p.add_argument("images", nargs="*", help="paths as indexed (absolute, or relative to here) or sha256 values")
    p.add_argument("--list", help="a text file of more paths or sha256 values, one per line (default: none)")

    p = command("rollback", "restore a corpus as it was at one of its generations (`spade-faiss info` lists them: "
                            "each index run, merge, removal and rollback is one); the corpus is rewritten whole, the "
                            "state it replaces is kept (the rollback is a generation too) and the image index rebuilt; "
                            "needs the corpus to itself", _index_args)
    p.add_argument("store", help="corpus file")
    p.add_argument("--generation", type=int, required=True, metavar="G", help="the generation to restore")
    add_params(p.add_argument_group("seed"), ("seed",))

    p = command("reindex", "rebuild and retrain the image index of a corpus", _index_args)
    p.add_argument("store", help="corpus file")
    add_params(p.add_argument_group("seed"), ("seed",))

    p = command("calibrate", "set image/pixel thresholds from held-out normal images (not in the corpus)",
                _model_args, _scoring_args, _run_args, _input_args)
    p.add_argument("store", help="corpus file")
    p.add_argument("src", help="held-out normal images: a folder, a list file, a video, or an MVTec category "
                               "(train/good; its images must not be indexed)")
    add_params(p, ("fpr", "event_s"))

    p = command("score", "score images against a corpus into a run directory (resumable)",
                _model_args, _scoring_args, _run_args, _backend_args, _input_args, _temporal_args)
    p.add_argument("store", help="corpus file")
    p.add_argument("src", help="a folder (images and videos), a text file of paths, a video file, or an MVTec "
                               "category (scores test/)")
    p.add_argument("--out", required=True, help="run directory: run.json, scores.csv, maps.h5, overlays/, "
                                                "report.html")
    p.add_argument("--maps", default="all", choices=["all", "none", "auto"],
                   help="pixel maps for every image, none (image scores only: fast), or auto (only images "
                        "above the image threshold tau, the paper's gating; needs calibration)")
    p.add_argument("--tau", type=float, help="image threshold (default: the corpus's calibrated one)")
    p.add_argument("--theta", type=float, help="pixel threshold (default: the corpus's calibrated one)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays/*.png")
    p.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    p.add_argument("--correspondences", action="store_true",
                   help="also store each location's nearest normal patch per level in maps.h5, and explain the "
                        "5 highest-scoring images in explain/")
    p.add_argument("--restart", action="store_true", help="delete the results already in --out first")
    p.add_argument("--shard-index", type=int, default=0, help="score every --num-shards-th image from this one")
    p.add_argument("--num-shards", type=int, default=1, help="shards run by any scheduler into one run directory")

    p = command("watch", "score a live source as it comes: a camera (its index), a stream URL (rtsp://, http://), "
                         "a video file played at its frame rate, or a growing folder; stage 2 only for frames above "
                         "tau by default; SIGINT/SIGTERM stop it cleanly", _model_args, _scoring_args, _run_args)
    p.add_argument("source", help="camera index (0), stream URL, video file, or a folder new images arrive in")
    p.add_argument("store", help="corpus file (calibrated, for the default --maps auto)")
    p.add_argument("--out", required=True, help="run directory: run.json, scores.csv, maps.h5 (frames with a map), "
                                                "overlays/ of flagged frames")
    p.add_argument("--maps", default="auto", choices=["all", "none", "auto"],
                   help="pixel maps only for frames above tau (auto, the paper's gating), for every frame, or none")
    p.add_argument("--tau", type=float, help="image threshold (default: the corpus's calibrated one)")
    p.add_argument("--theta", type=float, help="pixel threshold (default: the corpus's calibrated one)")
    p.add_argument("--no-overlays", action="store_true", help="do not write overlays/*.png")
    p.add_argument("--restart", action="store_true", help="delete the results already in --out first")
    add_params(p.add_argument_group("which frames"), ("frame_stride",))
    p.add_argument("--buffer", type=int, default=1,
                   help="frames kept waiting for the scorer; a newer one pushes out the oldest, counted as dropped")
    p.add_argument("--loop", action="store_true", help="play a video file again from the start at its end")
    p.add_argument("--max-frames", type=int, help="stop after scoring this many frames (default: no limit)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: no limit)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics (rate, lag, drops, counts) on this "
                                                    "port (needs the 'serve' extra; default: none)")
    p.add_argument("--metrics-host", default=PARAM["host"].default, help="address of the metrics endpoint")

    p = command("evaluate", "paper-style evaluation of MVTec-layout categories (index, calibrate, score)",
                _feature_args, _scoring_args, _run_args)
    p.add_argument("dataset", help="a dataset root with categories, or one category (--protocol stc: a ShanghaiTech "
                                   "Campus root)")
    p.add_argument("--protocol", choices=["mvtec", "stc"], default="mvtec",
                   help="mvtec (categories: index, calibrate, score, image/pixel metrics) or stc (ShanghaiTech "
                        "Campus, the paper's video setting: 256x256 frames, K=1, ~5000 training frames, every 5th "
                        "test frame, pooled frame- and pixel-level ROCAUC)")
    p.add_argument("--train-frames", type=int, default=5000, help="--protocol stc: training frames indexed")
    p.add_argument("--test-stride", type=int, default=5, help="--protocol stc: every N-th test frame is scored")
    p.add_argument("--categories", nargs="*", help="only these categories (default: all found)")
    p.add_argument("--out", required=True, help="output directory (corpora are built or reused there)")
    add_params(p, ("fpr",))
    p.add_argument("--no-overlays", action="store_true", help="do not write per-image overlays")

    p = command("explain", "why an image is anomalous: its most anomalous and most normal points beside their "
                           "nearest normal patches (PNG)", _model_args, _scoring_args, _run_args)
    p.add_argument("store", help="corpus file")
    p.add_argument("image", help="the image to explain")
    p.add_argument("--out", required=True, help="PNG file to write")

    p = command("report", "write RUN_DIR/report.html: one self-contained page (no server, no network)")
    p.add_argument("run", help="run directory written by `score`")

    p = command("convert", "write a corpus in another stored representation (format v2; v1 files migrate)")
    p.add_argument("store", help="corpus file to read (left unchanged)")
    p.add_argument("--out", required=True, help="new corpus file (written under a temporary name, then renamed)")
    add_params(p.add_argument_group("the new corpus"), ("storage", "seed"))  # float16 by default: v1 -> v2

    p = command("info", "print a corpus file's metadata (JSON)")
    p.add_argument("store", help="corpus file")

    p = command("verify", "check a corpus file's integrity; exit status 1 on any problem")
    p.add_argument("store", help="corpus file")
    p.add_argument("--rehash", action="store_true", help="re-hash the source images and compare")
    p.add_argument("--deep", action="store_true", help="read every level row")
    p.add_argument("--repair", action="store_true",
                   help="quarantine each segment readers refuse (renamed *.quarantined, kept) so the corpus opens "
                        "without it")

    p = command("serve", "online scoring over HTTP (needs the 'serve' extra)", _model_args, _scoring_args, _run_args)
    p.add_argument("store", nargs="+", help="corpus file(s), each PATH or NAME=PATH (default name: the file's "
                                            "stem); several are served under /v1/corpora/NAME/, one model per "
                                            "distinct weights")
    add_params(p, ("host", "port"))
    p.add_argument("--token-file", help="file holding the bearer token every endpoint but /v1/health requires")
    add_params(p.add_argument_group("service limits"), SERVICE_OPTIONS)

    p = command("bench", "run the benchmark scripts of benchmarks/ (JSON lines on stdout); "
                         "`bench compress CORPUS HELD_OUT` measures each stored representation on your own data")
    p.add_argument("which", nargs="*",
                   help=f"any of {list(commands.BENCHES)} (default: all), or compress CORPUS HELD_OUT")
    p.add_argument("--quick", action="store_true", help="small sizes on generated data: a few minutes in all")
    p.add_argument("--out", help="folder for the plots and corpora the benchmarks write (default: a new folder "
                                 "under the system's temporary directory, printed on stderr)")
    return ap


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"spade-faiss: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """The ``spade-faiss`` command. Process-wide settings are made here and nowhere in the
    library: the heap's (only for the process's own command line, ``argv`` None: it cannot be
    undone) and torch's thread count for ``--threads`` (restored when the command returns, so a
    caller in the same process keeps its own)."""
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
    except ValueError as e:
        print(f"spade-faiss: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if argv is None:
        keep_freed_memory()
        _environment()
    with _threads(getattr(args, "threads", None)):
        return _dispatch(args)


def _environment() -> None:
    """What the process's environment sets (read here, at the entry point, and nowhere in the library)."""
    from ..patch_search import bounds

    forced = os.environ.get(bounds.OPERAND_VARIABLE)
    if forced:
        bounds.force_operand(forced)


@contextlib.contextmanager
def _threads(n: int | None):
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _dispatch(args) -> int:
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        try:
            return commands.COMMANDS[args.command](args)
        except KeyboardInterrupt:
            print("spade-faiss: interrupted; committed work is kept, re-run the same command to resume",
                  file=sys.stderr)
            return 130
        except (ValueError, FileNotFoundError, FileExistsError, OSError, RuntimeError, ImportError) as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"spade-faiss: error: {text}", file=sys.stderr)
            return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
