"""What a finished run shows: transition lines, the per-phase summary table, peak memory, the plot."""

from __future__ import annotations

import logging
import warnings

import pytest
from lightning.pytorch.loggers import CSVLogger

from helpers import ToyModule, trainer
from phasetune import FinetuningScheduler, FTSEarlyStopping
from phasetune.features.peak_memory import KIND_LABELS, PeakMemory
from phasetune.lightning.summary import ValidationHistory, plot_phases, summary_table
from phasetune.run import PhaseRecord
from phasetune.util.text import covering_modules, fmt_bytes, fmt_count, format_table

EPOCHS = {0: {"params": ["model.head.*"], "max_transition_epoch": 2},
          1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 3},
          2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02}}


def fit_toy(tmp_path, schedule=EPOCHS, max_epochs=4, losses=None, **fts_kwargs):
    fts = FinetuningScheduler(schedule, **fts_kwargs)
    history = ValidationHistory()
    t = trainer(tmp_path, [fts, history, FTSEarlyStopping(monitor="val_loss", patience=1)], max_epochs=max_epochs,
                logger=CSVLogger(str(tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(ToyModule(val_losses=losses))
    return t, fts, history


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One toy fit through 3 phases (epoch caps 2 and 3, 4 epochs); phase 0's best val_loss is at epoch 1."""
    handler, logger = Lines(), logging.getLogger("phasetune")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        t, fts, history = fit_toy(tmp_path_factory.mktemp("run"), losses=[0.9, 0.5, 0.7, 0.6])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return t, fts, history, [line for line in handler.lines if "->" in line]


def test_transition_line_says_what_why_lr_and_restore(run):
    lines = run[3]
    assert lines[0] == (
        "phasetune: phase 0 -> 1 at epoch 2 (max_transition_epoch reached): restored the best state "
        "(val_loss=0.5 at epoch 1); thawed model.layers.2-3 (608 params in 8 tensors) at lr 0.05; "
        "46.1% of the parameters now train"  # (34 + 608) of 1394
    )
    assert "phase 1 -> 2 at epoch 3" in lines[1] and "thawed model.embed, model.layers.0-1" in lines[1]
    # phase 1's only check (0.7) did not beat the run's best (0.5, phase 0): back to where phase 1 started
    assert "phase 1 did not beat the best val_loss=0.5 at epoch 1: rolled back to the state it started from" in lines[1]


def test_transition_line_says_when_the_last_state_is_kept(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="phasetune"):
        fit_toy(tmp_path, max_epochs=3, restore_best=False)
    assert "kept the last state (restore_best=False)" in next(r.getMessage() for r in caplog.records if "->" in r.getMessage())


def test_every_phase_records_its_peak_memory(run):
    fts = run[1]
    kind = PeakMemory("cpu").kind
    assert [r.depth for r in fts.history] == [0, 1, 2]
    assert all(r.peak_memory_kind == kind and r.peak_memory > 10 * 2**20 for r in fts.history)  # at least 10 MiB


def test_summary_table_has_a_row_per_phase_and_a_total(run):
    fts = run[1]
    lines = summary_table(fts.history, "val_loss").splitlines()
    assert lines[0].split() == ["phase", "epochs", "steps", "trainable", "params", "lr", "best", "val_loss", "@",
                                "epoch", "wall", "time", "peak", "memory", "ended", "by", "audit"]
    rows = [line.split() for line in lines[2:5]]
    assert [r[:3] for r in rows] == [["0", "2", "8"], ["1", "1", "4"], ["2", "1", "4"]]
    assert rows[0][3:6] == ["34", "(2.4%)", "optimizer's"]  # the head: 34 of 1394 parameters
    assert rows[0][6:9] == ["0.5", "@", "1"]  # phase 0's best val_loss was at epoch 1
    assert rows[1][5] == "0.05" and rows[0][-3:-1] == ["epoch", "cap"]
    assert [r[-1] for r in rows] == ["passed"] * 3  # every phase passed the thaw audit after its first step
    assert lines[5].split()[:3] == ["all", "4", "16"]
    assert lines[-1] == f"peak memory: {KIND_LABELS[fts.history[0].peak_memory_kind]}"


def test_summary_of_a_phase_still_running_shows_dashes():
    rec = PhaseRecord(depth=0, start_epoch=0, start_step=0, lr=None, trainable_params=10, total_params=40)
    row = summary_table([rec]).splitlines()[2].split()
    assert row[:3] == ["0", "-", "-"] and row[-2:] == ["-", "-"]


def test_the_audit_column_says_passed_failed_or_no_step_and_a_failure_is_spelt_out():
    recs = [PhaseRecord(depth=d, start_epoch=d, start_step=4 * d, lr=None, trainable_params=10, total_params=40,
                        end_epoch=d + 1, end_step=4 * d + 4, end_reason="max_transition_step reached") for d in range(3)]
    recs[0].audit = "audit phase 0: 2 tensors thawed, all trained; 1 group at the scheduled lrs; 18 frozen unchanged"
    recs[1].audit = "audit phase 1 (first step) FAILED: re-frozen after the thaw: 'layers.3.lin.weight'"
    recs[2].audit = "audit phase 2 (transition): 20 trainable tensors, each requiring grad and in exactly one of 3 ..."
    lines = summary_table(recs).splitlines()
    assert lines[2].split()[-3:] == ["step", "cap", "passed"]
    assert lines[3].split()[-3:] == ["step", "cap", "FAILED"]
    assert lines[4].split()[-4:] == ["step", "cap", "no", "step"]  # checked at its transition, never stepped
    assert lines[-1] == recs[1].audit  # the failure's line under the table


def test_validation_history_and_plot(run, tmp_path):
    _, fts, history, _ = run
    assert [p.step for p in history.points] == [4, 8, 12, 16]
    assert set(history.points[0].metrics) == {"val_loss", "val_real_loss"}
    path = plot_phases(tmp_path / "phases.png", history.points, fts.history, metrics=("val_loss", "val_real_loss"),
                       baseline=history.points[:2], title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_refuses_metrics_that_were_never_logged(run, tmp_path):
    _, fts, history, _ = run
    with pytest.raises(ValueError, match=r"none of \['val_acc'\] was logged"):
        plot_phases(tmp_path / "p.png", history.points, fts.history, metrics=("val_acc",))


def test_covering_modules_names_whole_modules_and_joins_numbered_runs():
    names = ["emb.weight", *(f"layers.{i}.{p}" for i in range(6) for p in ("w", "b")), "head.w", "head.b"]
    assert covering_modules([n for n in names if n.startswith(("layers.4", "layers.5"))], names) == "layers.4-5"
    assert covering_modules(["emb.weight", "layers.0.w", "layers.0.b", "layers.2.w", "layers.2.b"], names) == (
        "emb, layers.0, layers.2")
    assert covering_modules(["layers.1.w"], names) == "layers.1.w"  # half of layers.1: the tensor itself
    assert covering_modules(names, names) == "emb, layers, head"
    assert covering_modules([f"layers.{i}.{p}" for i in (0, 2, 4) for p in "wb"], names, limit=2) == (
        "layers.0, layers.2 +1 more")


def test_number_formats_and_table():
    assert (fmt_count(22_713_986), fmt_count(148_610), fmt_count(512)) == ("22.7M", "149k", "512")
    assert (fmt_bytes(2**20 * 876), fmt_bytes(2**30 * 2.06)) == ("876 MiB", "2.06 GiB")
    assert format_table(["a", "bb"], [[1, 22], ["x", None]]).splitlines() == ["a  bb", "-  --", "1  22", "x"]

