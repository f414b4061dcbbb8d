"""Command line: a thin layer that parses flags, applies them to the config and calls a stage.

User errors print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import NeedleprobeError

DEFAULT_CONFIG = "configs/dataset_main.yaml"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, extract: bool, fit: bool) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.add_argument("--layers", type=_ints, help="override probe.layers_to_probe, e.g. 8,16")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="override probe.device")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    for split in ("train", "val"):  # they select the cache's rows, so fit and check accept them too
        p.add_argument(f"--max-{split}-docs", type=int, help=f"override probe.max_{split}_docs")
        p.add_argument(f"--max-{split}-tokens", type=int, help=f"override probe.max_{split}_tokens")
    if extract:
        p.add_argument("--doc-batch-size", type=int, help="documents per forward pass (rows do not depend on it)")
        p.add_argument("--max-batch-tokens", type=int, help="padded tokens per forward pass, instead of a document count")
        p.add_argument("--overwrite", action="store_true", help="rebuild a cache built with other settings")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if fit:
        p.add_argument("--l2-grid", type=_floats, help="override probe.l2_grid, e.g. 0.01,0.1")
        p.add_argument("--seeds", type=_ints, help="override probe.train_seeds, e.g. 0,1")
        p.add_argument("--class-balance", choices=["weighted", "downsample"], help="override probe.class_balance")
        p.add_argument("--solver", choices=["auto", "lbfgs", "minibatch"], help="override probe.solver")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="needleprobe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _common(ext := sub.add_parser("extract", help="run the model once and fill the activation cache"), True, False)
    _common(sub.add_parser("fit", help="train probes from the cache over the L2 grid"), False, True)
    _common(train := sub.add_parser("train", help="extract then fit (the seed's one-shot command)"), True, True)
    for p in (ext, train):
        p.add_argument("--repair", action="store_true", help="rewrite only the damaged chunks of the cache")
        p.add_argument("--force", action="store_true", help="extract even when the disk seems too small")
    _common(sub.add_parser("check", help="the seed's quality checks on the outputs"), False, False)
    mon = sub.add_parser("monitor", help="score whole documents with the probes (Task 3)")
    _common(mon, True, False)
    mon.add_argument("--layer", type=_ints, help="probe layer(s) to apply, e.g. 3 or 1,3 (default: all probed)")
    mon.add_argument("--seed", type=_ints, help="probe seed(s) to apply (default: all train_seeds)")
    mon.add_argument("--split", choices=["train", "val", "test"], help="split to score (default monitor.split)")
    _common(insp := sub.add_parser("inspect", help="summarise the activation cache (and whether it matches the config)"), False, False)
    insp.add_argument("--verify", action="store_true", help="read every chunk and list the damaged ones (exit 2 if any)")
    _common(sub.add_parser("report", help="write the self-contained HTML report"), False, False)
    dd = sub.add_parser("demo-data", help="write the offline demo dataset")
    dd.add_argument("--out", default="data/datasets/needles_demo_v1.jsonl")
    dd.add_argument("--seed", type=int, default=0)
    dd.add_argument("--debug", action="store_true")
    return parser


def _config(args):
    from .config import load_config, with_overrides

    cfg = load_config(args.config)
    over = {
        "layers_to_probe": getattr(args, "layers", None),
        "device": getattr(args, "device", None),
        "doc_batch_size": getattr(args, "doc_batch_size", None),
        "max_batch_tokens": getattr(args, "max_batch_tokens", None),
        "l2_grid": getattr(args, "l2_grid", None),
        "train_seeds": getattr(args, "seeds", None),
        "class_balance": getattr(args, "class_balance", None),
        "solver": getattr(args, "solver", None),
    }
    for split in ("train", "val"):
        for what in ("docs", "tokens"):
            over[f"max_{split}_{what}"] = getattr(args, f"max_{split}_{what}", None)
    return with_overrides(cfg, **over)


def run(args) -> int:
    from rich.markup import escape

    from .records import console

    con = console()
    if args.command == "demo-data":
        from .demo_data import write_demo_dataset

        path = write_demo_dataset(args.out, seed=args.seed)
        con.print(f"wrote {path}")
        return 0
    cfg = _config(args)
    from .distributed import is_primary

    if args.command in ("extract", "train"):
        from .extract import extract
        from .records import update_run_record

        res = extract(cfg, overwrite=args.overwrite, show_progress=not args.no_progress, repair=args.repair, force=args.force)
        if not is_primary():
            return 0  # under torchrun, rank 0 records the run and does everything after extract
        if res.status != "up to date":
            update_run_record(
                cfg,
                "repair" if res.status == "repaired" else "extract",
                {
                    "status": res.status,
                    "cache_path": res.path,
                    "cache_fingerprint": res.fingerprint,
                    "seconds": round(res.seconds, 3),
                    "tokens": res.tokens,
                    "tokens_per_second": round(res.tokens / res.seconds, 1) if res.seconds else None,
                    "splits": res.splits,
                },
            )
            con.print(f"extract: {res.tokens:,} tokens in {res.seconds:.1f} s → {res.path}")
    if not is_primary():
        return 0  # torchrun shards extract only; every other stage runs once, on rank 0
    if args.command in ("fit", "train"):
        from .fit import fit

        fit(cfg)
    if args.command == "monitor":
        from .monitor import monitor

        monitor(cfg, layers=args.layer, seeds=args.seed, split=args.split, show_progress=not args.no_progress)
    if args.command == "inspect":
        from .summary import inspect

        inspect(cfg, con, verify=args.verify)
    if args.command == "report":
        from .report import write_report

        con.print(f"wrote {write_report(cfg)}")
    if args.command == "check":
        from .check import check

        problems = check(cfg)
        if problems:
            for p in problems:
                con.print(f"[red]FAIL[/red] {escape(p)}")
            return 1
        con.print("[green]all checks passed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except NeedleprobeError as e:
        if getattr(args, "debug", False):
            raise
        print(f"needleprobe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("needleprobe: interrupted (an extract resumes where it stopped when run again)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
