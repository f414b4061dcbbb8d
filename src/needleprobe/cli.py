"""Command line: a thin layer that parses flags, applies them to the config and calls a stage.

User errors print one line and exit 2; ``--debug`` shows the traceback.
The help texts here are what users read, so they say what each command reads
and writes, in the README's words.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Sequence

from . import __version__
from .errors import NeedleprobeError
from .io.console import model_loading_bar, print_json, results

DEFAULT_CONFIG = "configs/dataset_main.yaml"
MODEL_COMMANDS = ("extract", "train", "monitor", "evaluate", "scan", "export")
"""Commands that load the model (and so show transformers' weight-loading bar)."""

DESCRIPTION = """\
Token-level linear probes on a language model's activations.

A JSONL dataset marks needle character spans inside documents. `extract` runs
the model once and caches the activations of the probed layers at needle tokens
and sampled other tokens; `fit` trains one logistic-regression probe per layer
and seed from that cache, as often as you like, without loading the model."""

EPILOG = f"""\
typical use:
  needleprobe demo-data                          # an offline demo dataset
  needleprobe extract --config configs/demo.yaml # run the model once
  needleprobe fit     --config configs/demo.yaml # train the probes from the cache
  needleprobe check   --config configs/demo.yaml # verify the results
  needleprobe errors  --config configs/demo.yaml # the tokens the best probe gets most wrong

Every command reads one YAML config (--config, default
{DEFAULT_CONFIG}); flags override single keys. Problems you can fix
are reported as one line with exit status 2 (--debug shows the traceback).
`needleprobe COMMAND --help` says what a command reads and writes."""

COMMANDS = {  # name: (one-line help, description)
    "extract": (
        "run the model once and fill the activation cache",
        "Run the model over the train and val documents of the dataset and store the activations of the probed "
        "layers (needle tokens and sampled other tokens) in a Zarr cache under probe.cache_dir. It prints the disk "
        "space needed before it starts. A finished cache is left as it is ('up to date'); an interrupted one "
        "resumes where it stopped; one built with other settings is refused (--overwrite rebuilds it).",
    ),
    "fit": (
        "train the probes from the activation cache",
        "Train one L2-regularised logistic-regression probe per layer and seed from the activation cache, without "
        "loading the model, and pick L2 by validation AUROC. Writes probe_layer_{L}_seed_{S}.pt and .json, "
        "probe_metrics.csv (val and train AUROC per L2) and verdict.json (the best layer and whether it beats the "
        "runner-up) under probe.output_dir/{name}_{version}, and the run record under probe.run_record_dir. "
        "Rows that exceed --fit-memory are read from the cache block by block (the same exact solver); under "
        "torchrun every process fits its share of the rows and rank 0 writes the files.",
    ),
    "train": (
        "extract, then fit, in one command",
        "Fill the activation cache (or reuse it when it is up to date), then train the probes from it: the same "
        "as `extract` followed by `fit`, and it writes what both write.",
    ),
    "check": (
        "check that every probe beats chance, its metadata is complete, and the run record matches the files on disk",
        "Check the results of `fit`: every probe beats chance on validation, its metadata is complete, and the run "
        "record matches the config and the files on disk (sha256). Prints each failure on one line and exits "
        "with status 1 if there is any.",
    ),
    "monitor": (
        "score whole documents with the probes",
        "Score every token of a split's documents with the saved probes (running the model, with the same batching, "
        "early stop and resume as extract), store the token logits in the run's monitor/ folder (never in the "
        "activation cache), and aggregate them into one score per document: mean, max, top-k mean, max of a "
        "rolling mean, softmax-weighted mean. Thresholds are set on the needle-free documents of "
        "monitor.calibration_split (default val, scored too) and applied to the split. Writes "
        "monitor_metrics_{split}.csv (document AUROC, TPR at 1% and 5% FPR with threshold, true and false positives, "
        "and the share of needle spans a running aggregate catches before they end, with the latency in tokens) "
        "and doc_scores_{split}.jsonl there. Logits already stored for a probe are reused.",
    ),
    "scan": (
        "score new documents with a calibrated monitor, one JSON line each",
        "Score documents with a probe as a deployed monitor: the probe and aggregation `monitor` recommended (or "
        "--layer, --seed, --aggregation) and the threshold set at --fpr on the calibration split's clean documents. "
        "--config is a config, a run directory or an exported monitor bundle. Reads FILE (or stdin, or -): JSON "
        "lines with text and optional doc_id, or plain text lines (one document each). Prints one JSON line per "
        "document on stdout (doc_id, score, threshold, flagged, aggregation, layer, top tokens with character "
        "spans), flushed batch by batch. A bad line is reported on stderr with its number and skipped (exit 2 at "
        "the end); --fail-on-flag exits 1 when a document is flagged. The model is the probe's own; nothing is "
        "written.",
    ),
    "export": (
        "write a monitor bundle (safetensors weights, monitor.json card, README model card)",
        "Write a directory that holds a monitor and loads without the run, the cache or the dataset "
        "(Monitor.load(directory), or scan --config directory): model.safetensors (the probe's coefficients on raw "
        "activations and its bias), monitor.json (model, site, layer, chat template, max_length, aggregation, "
        "thresholds per FPR with their calibration, metrics, dataset digest, needleprobe version) and a README "
        "model card. Needs `monitor` to have run (it calibrated the thresholds). No pickle.",
    ),
    "evaluate": (
        "score saved probes on another dataset (transfer)",
        "Score the probes of one run (--probes: its config or its probe directory) on another dataset's cached "
        "rows (--config: the target), extracting the split it scores first when the cache lacks it (test needs no "
        "cache: its tokens go through the model): token AUROC with a "
        "document-bootstrap 95% CI, average precision and TPR at 1% and 5% FPR per layer and seed, plus the "
        "document monitor's aggregations. Writes eval_metrics.csv and eval_metrics.json under the source run's "
        "transfer/{target}-{split}/. With --matrix A.yaml B.yaml ..., every dataset's best probes on every "
        "dataset's val split, as a CSV (trained on × evaluated on, per layer).",
    ),
    "errors": (
        "list the tokens the best probe gets most wrong, in their text",
        "List the highest-scoring negatives (false positives) and the lowest-scoring needle tokens (misses) of the "
        "best probe of a layer (--layer; default the best layer) on a cached split, each with its logit, document "
        "and the text around it, the token marked ⟦…⟧. Reads the activation cache, the probe files and the "
        "dataset's text; the model is not loaded. Writes nothing.",
    ),
    "inspect": (
        "summarise the activation cache and whether it matches the config",
        "Print what the activation cache holds (splits, rows and documents, layers, feature dtype, size on disk) and "
        "whether it was built with the config's settings (--layers and the row caps override them). Reads the cache "
        "only.",
    ),
    "report": (
        "write a self-contained HTML report of the probes",
        "Write report.html in the run directory, one file with no external resources: validation AUROC by "
        "layer and seed, ROC curves, AUROC against L2, and token heatmaps of example documents. Reads the probes, "
        "the cache and, when present, the monitor's results. Given several --config, one comparison report of "
        "their runs instead (AUROC by layer or by relative depth, the transfer matrix when evaluated, each run's "
        "document monitor as `monitor` stored it, each run's best probe).",
    ),
    "demo-data": (
        "write the offline demo dataset",
        "Write a JSONL dataset of 420 documents of English prose (Python's own documentation) with injected "
        "instructions as needles, built offline. Train, val and test needles are worded differently, so val "
        "AUROC measures generalisation to new wording.",
    ),
}


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


def _common(p: argparse.ArgumentParser, extract: bool, fit: bool, runs: bool = False, several: bool = False,
            caps: bool = True) -> None:
    """The flags several commands share; a command gets only those it uses (``--device``: it runs a model or a fit;
    ``caps``: the row caps, which select the cache's rows)."""
    if several:
        p.add_argument("--config", action="append", help=f"YAML config; repeat it to compare runs (default {DEFAULT_CONFIG})")
    else:
        p.add_argument("--config", help=f"YAML config (default {DEFAULT_CONFIG})")
    if runs:
        p.add_argument("--run", help="a named run beside the config's default one (its own probes, metrics and record)")
    p.add_argument("--layers", type=_ints, help="override probe.layers_to_probe, e.g. 8,16")
    if extract or fit:
        p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="override probe.device")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    _no_progress(p)
    for split in ("train", "val") if caps else ():  # they select the cache's rows, so fit and check accept them too
        p.add_argument(f"--max-{split}-docs", type=int, help=f"override probe.max_{split}_docs")
        p.add_argument(f"--max-{split}-tokens", type=int, help=f"override probe.max_{split}_tokens")
    if extract:
        p.add_argument("--doc-batch-size", type=int,
                       help="documents per forward pass (rows do not depend on it; default 8, and on CUDA, with "
                       "neither flag, as many tokens as free memory allows)")
        p.add_argument("--max-batch-tokens", type=int, help="padded tokens per forward pass, instead of a document count")
        p.add_argument("--overwrite", action="store_true", help="rebuild a cache built with other settings")
    if fit and not extract:
        p.add_argument("--overwrite", action="store_true",
                       help="replace the run's outputs even when they hold probes this fit would not rewrite, or another model's")
    if fit:
        p.add_argument("--l2-grid", type=_floats, help="override probe.l2_grid, e.g. 0.01,0.1")
        p.add_argument("--seeds", type=_ints, help="override probe.train_seeds, e.g. 0,1")
        p.add_argument("--class-balance", choices=["weighted", "downsample"], help="override probe.class_balance")
        p.add_argument("--solver", choices=["auto", "lbfgs", "minibatch"], help="override probe.solver")
        p.add_argument("--fit-memory", help="override probe.fit_memory: memory a fit may hold per device, e.g. 8MB, "
                       "40GB (beyond it, exact L-BFGS streams the rows from the cache)")


def _no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="hide progress bars, transformers' weight-loading bar too (it is hidden anyway when stderr is "
                   "not a terminal)")


def _json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON document on stdout instead of the table (messages stay on stderr)")


def _command(sub, name: str) -> argparse.ArgumentParser:
    help_, description = COMMANDS[name]
    return sub.add_parser(name, help=help_, description=description)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="needleprobe", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"needleprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _common(ext := _command(sub, "extract"), True, False)
    _common(_command(sub, "fit"), False, True, runs=True)
    _common(train := _command(sub, "train"), True, True, runs=True)
    for p in (ext, train):
        p.add_argument("--repair", action="store_true", help="rewrite only the damaged chunks of the cache")
        p.add_argument("--force", action="store_true", help="extract even when the disk seems too small")
    chk = _command(sub, "check")
    _common(chk, False, False, runs=True)
    for flag, kind, what in (("--l2-grid", _floats, "l2_grid"), ("--seeds", _ints, "train_seeds")):
        chk.add_argument(flag, type=kind, help=f"the probe.{what} the run was fitted with (as given to fit)")
    chk.add_argument("--class-balance", choices=["weighted", "downsample"], help="as given to fit")
    chk.add_argument("--solver", choices=["auto", "lbfgs", "minibatch"], help="as given to fit")
    chk.add_argument("--fit-memory", help="as given to fit (it never changes what fit writes)")
    mon = _command(sub, "monitor")
    _common(mon, True, False, runs=True)
    mon.add_argument("--layer", type=_ints, help="probe layer(s) to apply, e.g. 3 or 1,3 (default: all probed)")
    mon.add_argument("--seed", type=_ints, help="probe seed(s) to apply (default: all train_seeds)")
    mon.add_argument("--split", choices=["train", "val", "test"], help="split to score (default monitor.split)")
    err = _command(sub, "errors")
    _common(err, False, False, runs=True)
    err.add_argument("--layer", type=int, help="the layer whose best probe to use (default: the best layer)")
    err.add_argument("--split", choices=["train", "val"], default="val", help="cached split to score (default val)")
    err.add_argument("-n", type=int, default=20, help="how many tokens in each list (default %(default)s)")
    _json(err, "both lists, each token with its logit, document, offsets and context")
    _common(insp := _command(sub, "inspect"), False, False)
    insp.add_argument("--verify", action="store_true", help="read every chunk and list the damaged ones (exit 2 if any)")
    _json(insp, "the cache's facts (and with --verify, what reading every chunk found)")
    _common(_command(sub, "report"), False, False, runs=True, several=True, caps=False)
    ev = _command(sub, "evaluate")
    _common(ev, True, False)
    ev.add_argument("--probes", help="the probes to evaluate: a config (its run) or a probe directory")
    ev.add_argument("--probes-run", help="the named run of --probes, when it is a config")
    ev.add_argument("--split", choices=["train", "val", "test"], default="val", help="target split (default val)")
    ev.add_argument("--matrix", nargs="+", metavar="CONFIG", help="a transfer matrix over these configs (same model)")
    _json(ev, "what eval_metrics.json holds and where it is (with --matrix: the matrix's cells and the CSV's path)")
    for name in ("scan", "export"):
        p = _command(sub, name)
        p.add_argument("--config", help=f"a YAML config, a run directory or (scan) a monitor bundle (default "
                       f"{DEFAULT_CONFIG})")
        p.add_argument("--run", help="a named run of the config")
        p.add_argument("--layer", type=int, help="the probe's layer (default: the one `monitor` recommended)")
        p.add_argument("--seed", type=int, help="the probe's seed (default: the one `monitor` recommended)")
        p.add_argument("--aggregation", help="mean, max, topk_mean, rolling_max or softmax_mean (default: the one "
                       "`monitor` recommended)")
        p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate whose calibrated threshold flags "
                       "(0: just above the highest clean calibration document; default %(default)s)")
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        _no_progress(p)
        if name == "scan":
            p.add_argument("file", nargs="?", metavar="FILE", help="JSONL or text lines (default: stdin)")
            p.add_argument("--fail-on-flag", action="store_true", help="exit 1 when any document is flagged")
            p.add_argument("--batch-size", type=int, default=16, help="documents per batch (default %(default)s)")
        else:
            p.add_argument("--out", help="the bundle's directory (required)")
            p.add_argument("--overwrite", action="store_true", help="replace a bundle already there")
    dd = _command(sub, "demo-data")
    dd.add_argument("--out", default="data/datasets/needles_demo_v1.jsonl", help="where to write it (default %(default)s)")
    dd.add_argument("--seed", type=int, default=0, help="seed of the document assembly (default %(default)s)")
    dd.add_argument("--debug", action="store_true", help="show full tracebacks")
    _no_progress(dd)
    return parser


def _given(args) -> dict:
    """The probe settings the command line gives (config key → value; None: not given)."""
    over = {
        "layers_to_probe": getattr(args, "layers", None),
        "device": getattr(args, "device", None),
        "doc_batch_size": getattr(args, "doc_batch_size", None),
        "max_batch_tokens": getattr(args, "max_batch_tokens", None),
        "l2_grid": getattr(args, "l2_grid", None),
        "train_seeds": getattr(args, "seeds", None),
        "class_balance": getattr(args, "class_balance", None),
        "solver": getattr(args, "solver", None),
        "fit_memory": getattr(args, "fit_memory", None),
    }
    for split in ("train", "val"):
        for what in ("docs", "tokens"):
            over[f"max_{split}_{what}"] = getattr(args, f"max_{split}_{what}", None)
    return over


def _config(args, path: str | None = None):
    from .config import load_config, with_overrides

    path = path if path is not None else args.config
    cfg = load_config(path or DEFAULT_CONFIG, default=path is None)
    return with_overrides(cfg, **_given(args))


def _run_config(args, cfg):
    """``cfg`` as its run was fitted (layers, seeds, grid… from the run record), the flags narrowing it."""
    from .run.record import run_config

    return run_config(cfg, getattr(args, "run", None), _given(args))


def _extract_stage(args, cfg, con) -> None:
    """``extract`` (and ``train``'s first step): refuse another model's run, extract, record each site's run."""
    from .io.processes import is_primary
    from .extract.extract import extract
    from .run.layout import Layout
    from .run.record import update_run_record

    layouts = {site: Layout.from_config(cfg.for_site(site), getattr(args, "run", None)) for site in cfg.probe.sites}
    if is_primary():  # before the model runs: a run of another model would be refused after it
        for layout in layouts.values():
            layout.refuse_foreign(args.command, args.overwrite, record_only=args.command == "extract")
    res = extract(cfg, overwrite=args.overwrite, show_progress=not args.no_progress, repair=args.repair, force=args.force)
    if is_primary() and res.status != "up to date":
        for site, (path, fp) in res.sites.items():
            update_run_record(
                layouts[site],
                cfg.for_site(site),
                "repair" if res.status == "repaired" else "extract",
                {
                    "status": res.status,
                    "cache_path": path,
                    "cache_fingerprint": fp,
                    **({"sites_in_one_pass": list(res.sites)} if len(res.sites) > 1 else {}),
                    "seconds": round(res.seconds, 3),
                    "tokens": res.tokens,
                    "tokens_per_second": round(res.tokens / res.seconds, 1) if res.seconds else None,
                    "splits": res.splits,
                },
            )
        con.print(f"extract: {res.tokens:,} tokens in {res.seconds:.1f} s → {', '.join(p for p, _ in res.sites.values())}")


def run(args) -> int:
    from rich.markup import escape

    from .io.console import console

    con = console()
    if args.command == "demo-data":
        from .data.demo import write_demo_dataset

        path = write_demo_dataset(args.out, seed=args.seed)
        con.print(f"wrote {path}")
        return 0
    if args.command in ("scan", "export"):
        return _deploy(args)
    if args.command == "report" and args.config and len(args.config) > 1:
        from .analysis.report.compare import write_comparison

        cfgs = [_run_config(args, _config(args, c)) for c in args.config]
        con.print(f"wrote {escape(str(write_comparison(cfgs, run=args.run)))}")
        return 0
    if args.command == "evaluate" and args.matrix:
        from .analysis.evaluate import transfer_matrix

        matrix = transfer_matrix([_config(args, c) for c in args.matrix], show_progress=not args.no_progress,
                                 show=not args.json)
        if args.json:
            print_json(matrix)
        return 0
    if args.command == "report":
        args.config = args.config[0] if args.config else None
    cfg = _config(args)
    from .io.processes import is_primary

    if args.command in ("extract", "train"):
        _extract_stage(args, cfg, con)
        if not is_primary() and args.command != "train":
            return 0  # under torchrun, rank 0 records the run and does everything after extract but fit
    if not is_primary() and args.command not in ("fit", "train"):
        return 0  # torchrun shards extract and fit; every other stage runs once, on rank 0
    if args.command == "evaluate":  # the probes' site picks the target's
        from .analysis.evaluate import evaluate

        if not args.probes:
            raise NeedleprobeError("evaluate: say which probes to score with --probes (a config or a probe directory)")
        answer = evaluate(cfg, args.probes, split=args.split, source_run=args.probes_run, layers=args.layers,
                          show_progress=not args.no_progress, show=not args.json)
        if args.json:
            print_json(answer)
        return 0
    sites = cfg.probe.sites
    status = 0
    answers: dict[str, dict] = {}  # --json: each site's answer, printed as one document at the end
    problems: list[str] = []  # found after the answer was made: reported once it is printed
    for site in sites:  # every stage after extract works on one site at a time: each site is a run of its own
        scfg = cfg.for_site(site)
        if len(sites) > 1 and is_primary():
            con.print(f"[bold]site {site}[/bold]")
        status = max(status, _run_site(args, scfg, con, answers, problems))
    if getattr(args, "json", False):
        print_json(answers[sites[0]] if len(sites) == 1 else {"sites": answers})
    if problems:
        raise NeedleprobeError(problems[0])
    if args.command == "report" and len(sites) > 1:
        from .analysis.report.compare import write_comparison

        cfgs = [_run_config(args, cfg.for_site(s)) for s in sites]
        con.print(f"wrote {escape(str(write_comparison(cfgs, run=args.run)))}")
    return status


def _deploy(args) -> int:
    """``scan`` and ``export``: a monitor loaded from a config, a run directory or a bundle."""
    from .deploy.monitor import Monitor

    if args.command == "export" and not args.out:
        raise NeedleprobeError("export: say where to write the bundle with --out DIR")
    source = args.config or DEFAULT_CONFIG
    mon = Monitor.load(source, layer=args.layer, seed=args.seed, aggregation=args.aggregation, fpr=args.fpr,
                       run=args.run)
    if args.command == "export":
        from .io.console import console

        console().print(f"wrote {mon.export(args.out, overwrite=args.overwrite)} ({mon!r})")
        return 0
    from .deploy.scan import open_input, scan

    stream, where = open_input(args.file)
    try:
        n, flagged, bad = scan(mon, stream, where, batch_size=max(1, args.batch_size))
    except BrokenPipeError:  # the reader went away (`scan ... | head`): stop quietly, as a pipe's tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    if bad:
        raise NeedleprobeError(f"{where}: {bad} line(s) skipped (each reported above); {n} document(s) scored, "
                               f"{flagged} flagged")
    return 1 if args.fail_on_flag and flagged else 0


def _run_site(args, cfg, con, answers: dict[str, dict], problems: list[str]) -> int:
    """One command on one activation site's run (``--json``: its answer into ``answers``)."""
    from rich.markup import escape

    if args.command in ("check", "monitor", "errors", "report"):
        cfg = _run_config(args, cfg)

    if args.command in ("fit", "train"):
        from .fit.fit import fit

        _imports_done()
        fit(cfg, run=args.run, overwrite=args.overwrite)
    if args.command == "monitor":
        from .analysis.monitor import monitor

        monitor(cfg, layers=args.layer, seeds=args.seed, split=args.split, run=args.run, show_progress=not args.no_progress)
    if args.command == "errors":
        from dataclasses import asdict

        from .analysis.errors import print_errors, token_errors

        lists = token_errors(cfg, layer=args.layer, split=args.split, n=args.n, run=args.run)
        if args.json:
            answers[cfg.probe.activation_site] = {"site": cfg.probe.activation_site, **asdict(lists)}
        else:
            print_errors(lists)
    if args.command == "inspect":
        from .cache.inspect import inspect

        facts, problem = inspect(cfg, verify=args.verify, show=not args.json)
        answers[cfg.probe.activation_site] = facts
        problems += [problem] if problem else []
    if args.command == "report":
        from .analysis.report.html import write_report

        con.print(f"wrote {escape(str(write_report(cfg, run=args.run)))}")
    if args.command == "check":
        from .analysis.check import check

        failures = check(cfg, run=args.run)
        out = results()  # the verdict of the checks is the answer: stdout
        for p in failures:
            out.print(f"[red]FAIL[/red] {escape(p)}")
        if failures:
            return 1
        out.print("[green]all checks passed")
    return 0


def tqdm_bars_shown(args) -> bool:
    """Whether transformers' tqdm bars may draw: not with --no-progress, and not when stderr is a pipe or a file
    (tqdm would write every frame there, joined by carriage returns). Our own bars (rich) print only their final
    state there, as one line. Commands that never load a model leave transformers unimported."""
    return args.command not in MODEL_COMMANDS or not (args.no_progress or not sys.stderr.isatty())


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # MKL may otherwise use fewer threads than asked when it judges the machine busy, and the split of a float
    # reduction follows the thread count: fixing it keeps a run's numbers independent of the machine's load.
    # Only effective before torch first calls MKL (no command has imported torch yet); the user's own setting wins.
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    parser = build_parser()
    args = parser.parse_args(argv)
    from .io.runtime import one_malloc_arena

    # a fit's memory: one malloc arena, set before Zarr's reader threads exist, so what they free is reused and
    # --fit-memory holds; the default again afterwards (main() also runs inside other programs, tests included)
    arena = args.command in ("fit", "train") and one_malloc_arena()
    try:
        with model_loading_bar(shown=tqdm_bars_shown(args)):
            return run(args)
    except NeedleprobeError as e:
        if getattr(args, "debug", False):
            raise
        print(f"needleprobe: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("needleprobe: interrupted (an extract resumes where it stopped when run again)", file=sys.stderr)
        return 130
    finally:
        if arena:
            one_malloc_arena(0)


_PROGRAM = False
"""True in the ``needleprobe`` program itself (:func:`entry`), False where another program calls :func:`main`."""


def _imports_done() -> None:
    """In the program, after a command's imports: what is alive now lives until exit, so the garbage collector
    need not walk it again (``gc.freeze``).  Torch's module graph cost a fit ~0.2 s of collections, on both of
    its threads' time (2 CPU cores); other programs calling :func:`main` keep their collector as it was."""
    if _PROGRAM:
        gc.freeze()


def entry() -> None:
    """The ``needleprobe`` program: :func:`main`, then an exit whose last collections skip what is alive
    (``gc.freeze``): once torch is imported they took ~0.3 s of the ~0.45 s that exiting took (2 CPU cores)."""
    global _PROGRAM
    _PROGRAM = True
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
