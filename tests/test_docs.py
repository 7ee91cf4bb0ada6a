"""Every command the README and docs/ show still runs: composed, checked, never trained.

Each ``python train.py ...``, ``python eval.py ...``, ``python analyze.py ...`` (also after ``srun`` or
``torchrun``) and ``make train ARGS="..."`` in a shell block or an inline code span is composed with Hydra's
compose API and put through the entry's config checks that need no model (``validate_config``), with the user's
own files (``ckpt_path``, ``model.path``, adapters, text-file corpora, imatrix files) left out and GPUs assumed present. ``-m``
sweeps are composed once per combination. Overrides a config would silently ignore (``outliers.ratio``
under ``outliers=all``) fail too. ``python -m npft_lightning export|report`` commands must use options
their ``--help`` lists. Shell variables (``$RUN``) stand for the user's folders.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from helpers import ROOT, compose, run_in_process
from omegaconf import DictConfig, open_dict

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRIES = {"train.py": "train", "eval.py": "eval", "analyze.py": "analyze"}
TOOLS = ("export", "report")
SHELL_FENCES = ("", "bash", "sh", "shell", "console")
HYDRA_VALUED_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd")
# Keys an outlier selector reads only when it scores weights: under outliers=all (every weight) they do nothing.
IGNORED_UNDER_ALL = ("ratio", "budget", "calibration_windows", "calibration_length", "calibration_seed", "refresh",
                     "pqi_intervals", "target")
SHELL_VARIABLE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)\}?")  # $RUN, ${SLURM_JOB_ID}; Hydra's ${quant.q4_0} is lower case


@dataclass(frozen=True)
class Command:
    where: str        # file:line, for the test id and the failure message
    entry: str        # train | eval | analyze | export | report
    args: tuple[str, ...]


# ------------------------------------------------------------------------------------------ extraction
def _shell_lines(text: str):
    """(line number, logical line) of the shell blocks and of the inline code spans outside any block."""
    in_block, keep, start, pending = False, False, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence:
            in_block, keep, pending = not in_block, fence.group(1) in SHELL_FENCES, ""
            continue
        if in_block:
            if not keep:
                continue
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending = ""
        else:
            for span in re.findall(r"`([^`\n]+)`", line):
                if re.match(r"(python3? |make train|srun |torchrun )", span):
                    yield number, span


def _command(where: str, line: str) -> Command | None:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as err:  # unbalanced quotes: a broken command, if it is one of ours
        mentions_ours = re.search(r"(train|eval|analyze)\.py|npft_lightning|make train", line)
        return Command(where, "unparsable", (line, str(err))) if mentions_ours else None
    tokens = [SHELL_VARIABLE.sub(lambda m: m.group(1).lower(), t) for t in tokens]
    if tokens[:2] == ["make", "train"]:
        args = next((t.split("=", 1)[1] for t in tokens if t.startswith("ARGS=")), "")
        return Command(where, "train", tuple(shlex.split(args)))
    for i, token in enumerate(tokens):
        if Path(token).name in ENTRIES and i > 0:
            return Command(where, ENTRIES[Path(token).name], tuple(tokens[i + 1:]))
        if token == "-m" and tokens[i + 1:i + 2] == ["npft_lightning"] and i + 2 < len(tokens):
            return Command(where, tokens[i + 2], tuple(tokens[i + 3:]))
    return None


def documented_commands() -> list[Command]:
    commands = []
    for path in DOCS:
        for number, line in _shell_lines(path.read_text()):
            command = _command(f"{path.relative_to(ROOT)}:{number}", line)
            if command is not None:
                commands.append(command)
    return commands


COMMANDS = documented_commands()
HYDRA_COMMANDS = [c for c in COMMANDS if c.entry in ENTRIES.values()]
TOOL_COMMANDS = [c for c in COMMANDS if c.entry not in (*ENTRIES.values(), "unparsable")]
UNPARSABLE = [c for c in COMMANDS if c.entry == "unparsable"]


# ------------------------------------------------------------------------------------------ checks
def _positionals(args: tuple[str, ...], valued_flags) -> list[str]:
    """The arguments that are neither a flag nor the value after one of ``valued_flags``."""
    positionals, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in valued_flags
        else:
            positionals.append(arg)
    return positionals


def _override_sets(args: tuple[str, ...]) -> list[list[str]]:
    """The override lists one command runs: one, or one per combination of a ``-m`` sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("-m", "--multirun") for a in args)
    items = _positionals(args, HYDRA_VALUED_FLAGS)  # Hydra's own flags (-m, --cfg job, --info, ...) are not overrides
    # The SLURM launcher is an optional plugin (pip install hydra-submitit-launcher), not part of this project.
    items = [a for a in items if not re.match(r"[+~]?hydra[./]launcher", a)]
    parsed = OverridesParser.create().parse_overrides(items)
    if not multirun:
        return [[o.input_line for o in parsed]]
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(combo) for combo in itertools.product(*choices)]


def _without_user_files(cfg: DictConfig, scratch: Path) -> DictConfig:
    """The composed config minus what only the user's machine holds: their checkpoints, model folders, text
    files and run folders (the docs name them as examples)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.paths = {"root_dir": str(ROOT), "log_dir": str(scratch), "output_dir": str(scratch), "cache_dir": str(scratch)}
        cfg.ckpt_path = None
        for key in ("adapter", "adapters"):  # eval.py / analyze.py: the user's trained adapter folders
            if key in cfg:
                cfg[key] = None
        imatrix = cfg.get("imatrix")
        if isinstance(imatrix, str) and imatrix not in ("calibration", "both"):  # the user's imatrix file
            cfg.imatrix = "calibration" if "noise" in cfg else True  # train.py's computed one / eval.py's
        if cfg.get("llamacpp_ppl") and importlib.util.find_spec("llama_cpp") is None:
            cfg.llamacpp_ppl = False  # the optional extra (make llamacpp) is not installed here
        if cfg.get("model") is not None and "path" in cfg.model:
            cfg.model.path = None
        corpus = (cfg.get("data") or {}).get("corpus") or {}
        for split in ("train", "validation", "test"):
            if split in corpus:
                corpus[split] = None
    return cfg


def check_command(command: Command, scratch: Path) -> None:
    """Raise (with the file and line) when a documented Hydra command does not compose or fails a config check."""
    from npft_lightning.tasks import checks

    for overrides in _override_sets(command.args):
        cfg = compose(command.entry, *overrides, hydra=True)
        outliers = cfg.get("outliers")
        if outliers is not None and outliers.get("method") == "all":
            ignored = [o for o in overrides if re.match(rf"outliers\.({'|'.join(IGNORED_UNDER_ALL)})\b", o)]
            assert not ignored, f"{command.where}: {ignored} is ignored under outliers=all (every weight); " \
                                f"select outliers=fisher (or experiment=npft_fisher) for it to act"
        checks.validate_config(_without_user_files(cfg, scratch), command.entry)


@cache
def tool_help(tool: str) -> str:
    proc = run_in_process(tool, ROOT, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture
def gpus_visible(monkeypatch):
    """The docs show GPU commands (trainer=gpu, ddp): check them as on a machine with 8 GPUs."""
    from npft_lightning.tasks import checks

    monkeypatch.setattr(checks, "visible_gpus", lambda: 8)


def test_docs_commands_are_found():
    """The extraction sees the commands of every kind (a change of the docs' layout must not hide them)."""
    entries = {c.entry for c in COMMANDS}
    assert {"train", "eval", "analyze", "export", "report"} <= entries, entries
    assert len(HYDRA_COMMANDS) >= 40
    assert any(c.where.startswith("README.md") for c in HYDRA_COMMANDS)
    assert any(any(a in ("-m", "--multirun") for a in c.args) for c in HYDRA_COMMANDS)


def test_docs_commands_parse_in_a_shell():
    assert not UNPARSABLE, [f"{c.where}: {c.args[1]}: {c.args[0]}" for c in UNPARSABLE]


@pytest.mark.parametrize("command", HYDRA_COMMANDS, ids=[c.where for c in HYDRA_COMMANDS])
def test_docs_command_composes(command, tmp_path, gpus_visible):
    check_command(command, tmp_path)


@pytest.mark.parametrize("tool", TOOLS)
def test_docs_tool_help_runs(tool):
    assert f"python -m npft_lightning {tool}" in tool_help(tool)


def check_tool_command(command: Command) -> None:
    """``python -m npft_lightning export|report`` commands: a known tool, options its --help lists, one positional."""
    assert command.entry in TOOLS, f"{command.where}: python -m npft_lightning {command.entry} is not a tool ({TOOLS})"
    text = tool_help(command.entry)
    options = [a.split("=", 1)[0] for a in command.args if a.startswith("--")]
    unknown = [o for o in options if not re.search(rf"{re.escape(o)}\b", text)]
    assert not unknown, f"{command.where}: {unknown} not in python -m npft_lightning {command.entry} --help"
    positionals = _positionals(command.args, set(re.findall(r"(--[a-z-]+) [A-Z]+", text)))  # options that take a value
    # A bare mention (`python -m npft_lightning report` in prose) names the tool; a command gives its one folder or file.
    assert len(positionals) == (1 if command.args else 0), f"{command.where}: one folder or checkpoint expected, got {positionals}"


@pytest.mark.parametrize("command", TOOL_COMMANDS, ids=[c.where for c in TOOL_COMMANDS])
def test_docs_tool_command_uses_its_options(command):
    check_tool_command(command)


@pytest.mark.parametrize("line", [
    "python train.py noise.distribution.bits=3",                   # a key of uniform_step, not of the default's quant_error
    "python train.py noise=quant_error outliers.ratio=2",          # ignored: the default selects every weight
    "python train.py -m noise.scale=0,1 outliers.calibration_windows=8",
    "python train.py experiment=npft_smollm3",                      # no such option
    "python eval.py adapter=logs/train/runs/<run>/adapter",       # a placeholder the shell reads as a redirection
    "python train.py trainer.max_step=5",                          # a misspelt key
])
def test_docs_check_rejects_a_stale_command(line, tmp_path, gpus_visible):
    """The guard itself: commands that went stale when the default changed fail it."""
    command = _command("example", line)
    with pytest.raises(Exception):  # noqa: B017 - any failure is the point: composition, a check or the rule above
        check_command(command, tmp_path)


def test_docs_tool_check_rejects_an_unknown_option():
    command = _command("example", "python -m npft_lightning report logs/sweep --output docs/x")
    with pytest.raises(AssertionError, match="--output"):
        check_tool_command(command)


def test_docs_links_resolve():
    """Relative links and images of the README and docs/ point at files that exist."""
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


# An upper-case name with an underscore (NPFT_CACHE, HYDRA_FULL_ERROR, a bench's TARGETS key): outside a shell
# variable ($MASTER_HOST is the user's), the code, configs or build files must name it too, else it is a
# placeholder left in the text (a "GEMMA_TRAIN_RSS" where a measured number belongs).
UPPER_NAME = re.compile(r"(?<![$\w{])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
SOURCE_GLOBS = ("npft_lightning/**/*.py", "bench/*.py", "tests/*.py", "*.py", "conf/**/*.yaml", "Makefile", ".ci/*",
                "pyproject.toml", ".importlinter")


def placeholders(text: str, source: str) -> list[str]:
    return [name for name in UPPER_NAME.findall(text) if name not in source]


def source_text(patterns) -> str:
    this_file = Path(__file__).resolve()  # its own example placeholder must not count as a use
    return "\n".join(p.read_text(errors="replace") for pattern in patterns for p in sorted(ROOT.glob(pattern))
                     if p.is_file() and p.resolve() != this_file)


def test_docs_have_no_placeholders():
    """Every upper-case name the README and docs/ show exists in the code: no unfilled placeholder ships."""
    source = source_text(SOURCE_GLOBS)
    found = [f"{path.relative_to(ROOT)}:{number}: {name}" for path in DOCS
             for number, line in enumerate(path.read_text().splitlines(), 1) for name in placeholders(line, source)]
    assert not found, f"placeholders left in the docs (fill in the measured value): {found}"


def test_config_comments_have_no_placeholders():
    """A config's comments, what a user reads beside an option, name only what the code names: the configs are
    the source the docs check counts, so a placeholder there (a "COST_QAT_Q4_0") needs its own check."""
    code = source_text(g for g in SOURCE_GLOBS if not g.startswith("conf/"))
    found = [f"{path.relative_to(ROOT)}:{number}: {name}" for path in sorted(ROOT.glob("conf/**/*.yaml"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if "#" in line
             for name in placeholders(line.split("#", 1)[1], code)]
    assert not found, f"placeholders left in config comments (fill in the measured value): {found}"


def test_docs_placeholder_check_catches_one():
    assert placeholders("training GEMMA_TRAIN_RSS; set HYDRA_FULL_ERROR=1; $MASTER_HOST:29500", "HYDRA_FULL_ERROR") == ["GEMMA_TRAIN_RSS"]


def test_docs_readme_is_short():
    """A newcomer reads the README in minutes; the reference lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
