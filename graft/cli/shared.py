"""The `graft` command: a thin typer layer over the library (every command calls an importable function)."""

from __future__ import annotations

import functools
import gc
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from graft.cli.options import config_option
from graft.config import MAX_BATCH_SIZE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_option
from graft.errors import GraftError
from graft.utils.text import display_name

__all__ = [
    "BATCH_SIZES", "DEBUG", "IMAGE_SIZES", "TOP_K", "WORKERS", "app", "check_runtime", "err", "friendly_errors",
    "main", "out", "print_label_set_classes", "print_table", "styled", "check_options"
]

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transfer learning: a folder of labelled images in, a fine-tuned classifier out.")
# markup=False: what graft prints is plain text, so `pip install 'graft[serve]'` and a class named `a[b]c` print as
# they are (rich markup would eat the brackets); colour comes only from explicit styles (styled below).
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)


def styled(prefix: str, style: str, message: str = "") -> Text:
    """``prefix`` in ``style`` followed by ``message`` as plain text (no markup is parsed in either)."""
    return Text.assemble((prefix, style), message)

# Shared option aliases (as huggingface_hub's CLI does), so each flag is spelled and documented once: those that are
# config fields take their flag and help from the field (graft.config), as `graft fit`'s generated options do.
BackboneOpt = Annotated[Optional[str], config_option("model.backbone")]
WeightsOpt = Annotated[Optional[str], config_option("model.weights")]
DeviceOpt = Annotated[str, config_option("train.device")]
ActivationOpt = Annotated[Optional[str], config_option("model.activation")]
NormOpt = Annotated[Optional[str], config_option("model.norm")]
InitOpt = Annotated[Optional[str], config_option("model.init")]
VggStagesOpt = Annotated[Optional[str], config_option("model.vgg_stages")]
BatchSizeOpt = Annotated[int, config_option("data.batch_size")]
PoolOpt = Annotated[str, config_option("model.pool")]
TTAOpt = Annotated[Optional[str], typer.Option(help="test-time augmentation: flip, crops or flip,crops")]
RuntimeOpt = Annotated[str, typer.Option(
    help="torch (eager PyTorch), onnx (ONNX Runtime on the run's verified export, made into RUN/runtime on first use) "
    "or auto (onnx on the CPU when onnxruntime is installed)", metavar="[auto|torch|onnx]")]


def check_runtime(runtime: str) -> None:
    """Refuses a ``--runtime`` that is not one of graft.models.onnx_engine's ``RUNTIMES``."""
    from graft.models.onnx_engine import RUNTIMES

    if runtime not in RUNTIMES:
        raise GraftError(f"--runtime '{runtime}' not understood: choose one of {', '.join(RUNTIMES)}")


def friendly_errors(command):
    """Prints a GraftError as one line (no traceback) and exits with status 2; Ctrl-C or SIGTERM exits with 130
    after the library has left its last checkpoint on disk."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        previous = _on_sigterm(_interrupt)  # a scheduler's stop (SIGTERM) is handled like Ctrl-C
        try:
            return command(*args, **kwargs)
        except GraftError as error:
            err.print(styled("error:", "red", f" {error}"))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print(styled("interrupted", "yellow"))
            raise typer.Exit(130) from None
        finally:
            _on_sigterm(previous)

    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Installs a SIGTERM handler, returning the previous one; a no-op off the main thread (Python forbids it there)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    # display_name: a class or file name that is not UTF-8 would stop the terminal's encoder
    table = Table(title=display_name(title), title_justify="left")
    for column in columns:
        table.add_column(display_name(column))
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else display_name(str(v)) for v in row])
    out.print(table)


def print_label_set_classes(title: str, per_class: list[dict]) -> None:
    """A multi-label evaluation's per-class rows (``graft.evaluation.multilabel.multilabel_metrics``) as a table."""
    print_table(title, ["class", "AP", "precision", "recall", "F1", "threshold", "images"],
                [[row["class"], "-" if row["ap"] is None else row["ap"], row["precision"], row["recall"], row["f1"],
                  row["threshold"], row["support"]] for row in per_class])


PretrainedOpt = Annotated[bool, config_option("model.pretrained")]
ImageSizeOpt = Annotated[Optional[int], config_option("data.image_size")]
CacheOpt = Annotated[Optional[str], config_option("data.cache_dir")]
WorkersOpt = Annotated[int, config_option("data.workers")]


IMAGE_SIZES, BATCH_SIZES, WORKERS, TOP_K = (MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), (1, MAX_BATCH_SIZE), (-1, 64), (1, 1000)


def check_options(*checks: tuple) -> None:
    """Range checks of options that are not config fields (those are checked in graft.config): each check is
    (flag, value, low, high[, low_open[, note]]); a value of None (option not given) passes."""
    for flag, value, low, high, *rest in checks:
        low_open, note = (list(rest) + [False, ""][len(rest):])[:2]
        check_option(flag, value, low, high, low_open=low_open, note=note)
DEBUG = {"on": False}  # set by the global --debug flag: an unexpected exception prints its traceback


def _print_version(asked: bool) -> None:
    if asked:
        from graft.utils.versions import installed_versions

        found = installed_versions()
        out.print(f"graft {found.pop('graft')} ({', '.join(f'{name} {version}' for name, version in found.items())})")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="print the traceback of an internal error")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="print graft's version and torch's, timm's, Python's")] = False,
) -> None:
    DEBUG["on"] = debug


def main() -> None:
    """The `graft` entry point. Last resort for a bug (an exception no check turned into a GraftError): one line
    naming a log file with the traceback, exit status 1; with --debug, the traceback itself."""
    try:
        app()
    except Exception as error:  # KeyboardInterrupt and SystemExit (typer's exits) pass through
        if DEBUG["on"]:
            raise
        text = (str(error).splitlines() or [""])[0][:200]
        err.print(styled("internal error:", "red", f" {type(error).__name__}: {text}; details in "
                         f"{_log_traceback(error)} (--debug prints them)"))
        sys.exit(1)
    finally:
        # the command is over and its files are closed: the interpreter's last collections would walk every object
        # torch, timm and sympy made (1.3 s of a cold probe's exit); frozen objects are skipped, the OS frees them
        gc.freeze()


def _log_traceback(error: BaseException) -> str:
    """Writes the traceback to a new file under the user cache folder (else the temp folder); returns its path."""
    import os
    import tempfile
    import traceback

    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graft" / "logs"
    for folder in (base, Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, path = tempfile.mkstemp(prefix="graft-internal-error-", suffix=".log", dir=folder)
            with os.fdopen(handle, "w", encoding="utf-8", errors="backslashreplace") as file:
                file.write(f"graft {' '.join(sys.argv[1:])}\n\n{details}")
            return path
        except OSError:
            continue
    return "nowhere (no writable cache or temp folder)"


if __name__ == "__main__":
    main()
