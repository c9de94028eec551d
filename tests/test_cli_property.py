"""A property test over the whole CLI: hostile option values end in exit 0 or one clear line, never a traceback,
and no command touches a file outside the folder it was told to write.

For each command, a fast valid invocation is the base; hypothesis replaces one or two of its options (or adds
them) with values drawn from a list a hostile or careless user would type: 0, negatives, NaN, infinities, huge
numbers, empty and unicode strings, paths that are files, the data folder, the current folder. Every pre-existing
file in the sandbox (the data, a decoy project, the run folder) is fingerprinted before and after.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

EXAMPLES = int(os.environ.get("GRAFT_CLI_EXAMPLES", "6"))  # per command; a long run: GRAFT_CLI_EXAMPLES=200
# Catches a real hang only: each base invocation is bounded by size (32 px, one batch, 1 epoch, tiny data), so a
# normal example takes seconds; 60 s once failed `advise` on a loaded machine while nothing was wrong.
SECONDS = 600

NUMBERS = ["0", "-1", "-3", "nan", "inf", "-inf", "1e308", "99999999999999999999", "2147483648", "0.5", "5"]
STRINGS = ["", " ", "ü☃", "../../escaped", "a" * 300, "x:y:z", "mlp:0", "@FILE", "@DATA", "@CWD", "@MISSING"]
TOKENS = NUMBERS + STRINGS
# --set and --config take their own hostile values: dunder and non-field keys, values of the wrong type or size,
# files that are not YAML, not UTF-8 or nested thousands deep
SET_TOKENS = ["train.__init__.x=1", "__class__=1", "train.lr.x=1", "train.lr=nan", "train.epochs=99999999999999999999",
              "model.backbone=../../escaped", "output=@CWD", "data.path=@FILE", "train.lr=" + "[" * 3000, "=1",
              "train.lr", "train.lr=", "log=wandb", "model.head=mlp:0", "train.lr=abc", "train=5"]
CONFIG_TOKENS = ["@FILE", "@DATA", "@CWD", "@MISSING", "@DEEP", "@LATIN1", "@LIST", "@DUNDER", ""]


class RanAway(BaseException):
    """Raised by the alarm: not an Exception, so no handler in graft can swallow it."""


@dataclass
class Command:
    """A fast valid invocation (`{DATA}`, `{RUN}`, `{OUT}` are filled in) and the options hypothesis may replace."""

    base: list[str]
    options: list[str]
    writes_run: bool = False  # export's default output and precise-bn write inside the run folder
    extra_outputs: list[str] = field(default_factory=list)  # default output folders, relative to the sandbox
    tokens: list[str] = field(default_factory=lambda: TOKENS)  # the values hypothesis draws for the options


FAST_FIT = ["-b", TINY, "--no-pretrained", "--image-size", "32", "--batch-size", "16", "--epochs", "1",
            "--limit-batches", "1", "--strategy", "scratch", "--augment", "none", "--time-budget", "20"]
COMMANDS = {
    "layers": Command(["layers", TINY, "--size", "32"], ["--size"]),
    "fit": Command(["fit", "{DATA}", "-o", "{OUT}", *FAST_FIT],
                   ["-o", "--epochs", "--head-epochs", "--lr", "--finetune-lr-ratio", "--stem-lr-ratio", "--unfreeze",
                    "--cut-at", "--pool", "--head", "--time-budget", "--dropout", "--weight-decay", "--label-smoothing",
                    "--batch-size", "--image-size", "--val-fraction", "--patience", "--seed", "--workers",
                    "--limit-batches", "--augment-views", "--strategy", "--cache", "--weights", "--device",
                    "--precision", "--optimizer", "--balance", "--vgg-stages", "--init", "--log", "--random-erasing",
                    "--mixup", "--cutmix", "--lr-decay", "--probe-patience", "--test-fraction", "--accumulate",
                    "--checkpoint-every", "--checkpoint-minutes", "--scan-all-up-to"]),
    "predict": Command(["predict", "{RUN}", "{DATA}", "--batch-size", "8"],
                       ["--top-k", "--batch-size", "--format", "--output", "--tta", "--device"]),
    "evaluate": Command(["evaluate", "{RUN}", "{DATA}", "--output", "{OUT}", "--no-report"],
                        ["--top-k", "--batch-size", "--output", "--split", "--tta"]),
    "features": Command(["features", "{DATA}", "-b", TINY, "--no-pretrained", "--image-size", "32", "-o", "{OUT}"],
                        ["--cut-at", "--pool", "--augment", "--batch-size", "--image-size", "-o", "--cache"]),
    "probe": Command(["probe", "{DATA}", "--backbones", TINY, "--no-pretrained", "--image-size", "32", "-o", "{OUT}"],
                     ["--stages", "--pool", "--image-size", "-o", "--backbones"]),
    "advise": Command(["advise", "{DATA}", "-b", TINY, "--no-pretrained", "--image-size", "32"],
                      ["--image-size", "--cache", "--workers"]),
    "export": Command(["export", "{RUN}", "-o", "{OUT}", "--format", "safetensors"],
                      ["-o", "--format", "--data"], writes_run=True),
    "precise-bn": Command(["precise-bn", "{RUN}", "--no-augment"], ["--data", "--device"], writes_run=True),
    "serve": Command(["serve", "{RUN}"], ["--port", "--max-upload-mb", "--max-pixels", "--max-batch", "--max-wait-ms",
                                          "--top-k", "--tta", "--host"]),
    "diagnose": Command(["diagnose", "{RUN}", "{DATA}", "--batch-size", "8", "-o", "{OUT}"],
                        ["--batch-size", "--lr", "--image-size", "-o"]),
    "lr-find": Command(["lr-find", "{DATA}", "-b", TINY, "--no-pretrained", "--image-size", "32", "--steps", "5",
                        "--batch-size", "8", "-o", "{OUT}"],
                       ["--steps", "--start-lr", "--end-lr", "--batch-size", "--image-size", "-o", "--strategy"]),
    "explain": Command(["explain", "{RUN}", "{DATA}/val/circle", "--batch-size", "8", "-o", "{OUT}"],
                       ["--top-k", "--class", "--batch-size", "-o", "--device"]),
    "shard": Command(["shard", "{DATA}", "-o", "{OUT}", "--shard-size", "1MB"],
                     ["-o", "--shard-size", "--val-fraction", "--seed"]),
    "stats": Command(["stats", "{DATA}", "--size", "16", "-o", "{OUT}"], ["--size", "--max-images", "-o"]),
    "fit-shards": Command(["fit", "{SHARDS}", "-o", "{OUT}", *FAST_FIT[:-6], "--strategy", "finetune", "--augment",
                           "none", "--time-budget", "20"],
                          ["-o", "--epochs", "--batch-size", "--image-size", "--strategy", "--accumulate",
                           "--random-erasing", "--limit-batches", "--workers", "--seed", "--val-fraction"]),
    "fit-set": Command(["fit", "{DATA}", "-o", "{OUT}", *FAST_FIT], ["--set", "--config"],
                       tokens=SET_TOKENS + CONFIG_TOKENS),
    "push": Command(["push", "{RUN}", "me/shapes", "--folder", "{OUT}"], ["--folder"], writes_run=True),
    "compare": Command(["compare", "{DATA}", "--scratch-backbone", TINY, "--strategies", "scratch", "--epochs", "1",
                        "--image-size", "32", "--batch-size", "16", "-o", "{OUT}"],
                       ["--epochs", "--budget", "--batch-size", "--image-size", "--strategies", "-o"]),
}
OUTPUT_OPTIONS = {"-o", "--output", "--cache", "--folder"}


def fingerprint(root: Path, skip: list[Path]) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file below root, except below the folders in skip."""
    prints = {}
    for path in root.rglob("*"):
        if path.is_file() and not any(path == s or s in path.parents for s in skip):
            stat = path.stat()
            prints[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return prints


def resolve(token: str, sandbox: Path) -> str:
    """Turns the path placeholders (also after a --set KEY=) into paths inside the sandbox."""
    configs = sandbox / "configs"
    places = {"@FILE": str(sandbox / "project" / "main.py"), "@DATA": str(sandbox / "data"), "@CWD": ".",
              "@MISSING": str(sandbox / "no" / "such" / "folder"), "@DEEP": str(configs / "deep.yaml"),
              "@LATIN1": str(configs / "latin1.yaml"), "@LIST": str(configs / "list.yaml"),
              "@DUNDER": str(configs / "dunder.yaml")}
    key, sep, value = token.partition("=")
    return f"{key}={places.get(value, value)}" if sep and key else places.get(token, token)


def write_configs(folder: Path) -> None:
    """Config files a careless or hostile user passes to --config (fingerprinted like every sandbox file)."""
    folder.mkdir()
    (folder / "deep.yaml").write_text("train: " + "{k: " * 5000 + "1" + "}" * 5000 + "\n")
    (folder / "latin1.yaml").write_bytes("train:\n  lr: 0.01\nmodel:\n  backbone: café\n".encode("latin-1"))
    (folder / "list.yaml").write_text("- train\n- lr\n")
    (folder / "dunder.yaml").write_text("train:\n  __init__:\n    x: 1\n")


def replace_options(args: list[str], changes: dict[str, str]) -> list[str]:
    """The base arguments with each changed option's value replaced (or the option appended)."""
    args = list(args)
    for option, value in changes.items():
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    return args


def _graft_made(folder: Path) -> bool:
    try:
        return (folder / ".graft-manifest.json").is_file()
    except OSError:  # a name too long for the file system, say
        return False


def _alarm(signum, frame):
    raise RanAway


@pytest.fixture
def sandbox(shapes, trained_run, tmp_path, monkeypatch):
    """A folder with the data, a copy of a finished run and a decoy project with user dotfiles; the current folder."""
    shutil.copytree(shapes, tmp_path / "data")
    shutil.copytree(trained_run, tmp_path / "run")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("main.py", ".env.local", ".eslintrc.json", ".gitlab-ci.yml"):
        (project / name).write_text("keep me\n")
    write_configs(tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)  # the server's checks run, the loop does not
    return tmp_path


def check_invocation(sandbox: Path, name: str, changes: dict[str, str]) -> None:
    from graft.cli.shared import app

    command = COMMANDS[name]
    output = Path(tempfile.mkdtemp(dir=sandbox, prefix="out-")) / "result"
    data = (sandbox / "data").resolve()
    changes = {option: resolve(value, sandbox) for option, value in changes.items()}
    if "{SHARDS}" in command.base and not (sandbox / "shards").exists():
        from graft.data.sharding import shard_dataset

        shard_dataset(sandbox / "data", sandbox / "shards", shard_size="1MB")
    args = [a.replace("{DATA}", str(sandbox / "data")).replace("{RUN}", str(sandbox / "run"))
            .replace("{SHARDS}", str(sandbox / "shards")).replace("{OUT}", str(output))
            for a in replace_options(command.base, changes)]
    fixed = [output.parent] + ([sandbox / "run"] if command.writes_run else [])  # may change inside these
    # New files may also appear where an output option pointed, unless that is inside the data.
    chosen = [Path(v).resolve() for o, v in changes.items() if o in OUTPUT_OPTIONS and v.strip()]
    writable = fixed + [c for c in chosen if not (c == data or data in c.parents)]
    # An output folder graft made in an earlier example may be rewritten in place (its manifest proves it is graft's)
    owned = [c for c in chosen if _graft_made(c) and c != sandbox.resolve()]
    before = fingerprint(sandbox, fixed + owned)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=True)
    except RanAway:
        pytest.fail(f"graft {' '.join(args)}: still running after {SECONDS} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    text = result.output
    described = f"graft {' '.join(args)} -> exit {result.exit_code}:\n{text[-2000:]}"
    assert not isinstance(result.exception, RanAway), f"ran past {SECONDS} s: {described}"
    assert result.exit_code in (0, 1, 2), described
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"unhandled {type(result.exception).__name__}: {described}") from result.exception
    assert "Traceback" not in text and "internal error" not in text, described
    if result.exit_code != 0 and "Usage:" not in text:  # click's own usage errors are its standard form
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"expected one 'error:' line: {described}"
    after = fingerprint(sandbox, fixed + owned)
    changed = sorted(k for k in before if after.get(k) != before[k])
    created = sorted(k for k in after if k not in before
                     and not any(w == (sandbox / k).parent or w in (sandbox / k).parents for w in writable))
    assert not changed, f"changed or removed {changed[:5]}: {described}"
    assert not created, f"wrote outside its output {created[:5]}: {described}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_hostile_option_values(name, sandbox):
    options = COMMANDS[name].options
    tokens = COMMANDS[name].tokens
    changes_strategy = st.dictionaries(st.sampled_from(options), st.sampled_from(tokens), min_size=1, max_size=2)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(changes=changes_strategy)
    def run(changes):
        check_invocation(sandbox, name, changes)

    run()
