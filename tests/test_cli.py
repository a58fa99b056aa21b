"""The ``phasetune`` command: LightningCLI subcommands, the fit report and baseline, schedule tools, errors."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from torch.utils.data import DataLoader

from helpers import ToyModule, dataset
from phasetune.lightning.cli import main


class ToyWithTest(ToyModule):
    """ToyModule with a test set, so ``--test_after_fit`` has something to evaluate."""

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_acc", (logits.argmax(-1) == y).float().mean())

    def test_dataloader(self):
        return DataLoader(dataset(32, 2), batch_size=32)


seen_optimizers: list[tuple[str, set[float]]] = []


class RecordsOptimizer(ToyWithTest):
    """Records the optimizer class and group lrs each fit starts with (after every callback's on_fit_start)."""

    def on_train_start(self):
        opt = self.trainer.optimizers[0]
        seen_optimizers.append((type(opt).__name__, {g["lr"] for g in opt.param_groups}))


SCHEDULE = {0: {"params": ["model.head.*"], "max_transition_epoch": 1},
            1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 2},
            2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02}}


def write_config(tmp_path: Path, schedule=SCHEDULE, **top) -> Path:
    """A `phasetune fit` config for the toy model; the schedule goes to its own file."""
    sched_file = tmp_path / "schedule.yaml"
    sched_file.write_text(yaml.safe_dump(schedule))
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 4, "default_root_dir": str(tmp_path), "enable_progress_bar": False,
            "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "phasetune.FinetuningScheduler", "init_args": {"ft_schedule": str(sched_file)}},
                {"class_path": "phasetune.FTSEarlyStopping", "init_args": {"monitor": "val_loss", "patience": 2}},
            ],
        },
        "model": {"class_path": "test_cli.ToyWithTest"},
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(*args: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main([str(a) for a in args])


# ------------------------------------------------------------------ fit
def test_fit_prints_the_phase_summary_and_writes_the_plot(tmp_path, capsys):
    assert run("fit", "--config", write_config(tmp_path)) == 0
    out = capsys.readouterr().out
    table = out[out.index("phase  epochs"):].splitlines()
    assert [row.split()[:3] for row in table[2:6]] == [["0", "1", "4"], ["1", "1", "4"], ["2", "2", "8"], ["all", "4", "16"]]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert f"phasetune: plot: {log_dir / 'phases.png'}" in out and (log_dir / "phases.png").stat().st_size > 0
    assert (log_dir / "config.yaml").exists()  # LightningCLI's saved config, as usual


def test_fit_with_baseline_trains_full_fine_tuning_for_the_same_steps_and_compares(tmp_path, capsys):
    cfg = write_config(tmp_path, baseline="also", baseline_lr=0.01, test_after_fit=True)
    assert run("fit", "--config", cfg) == 0
    out = capsys.readouterr().out
    assert "baseline: plain full fine-tuning of every parameter for 16 steps, the scheduled run's budget" in out
    comparison = out[out.index("run  "):].splitlines()
    assert comparison[0].split() == ["run", "steps", "wall", "time", "CPU", "time", "peak", "memory", "test_acc"]
    assert re.match(r"scheduled \(3 phases\) +16 +.* 0\.\d{4}$", comparison[2])
    assert re.match(r"full fine-tuning +16 +.* 0\.\d{4}$", comparison[3])
    assert (tmp_path / "lightning_logs" / "version_0_baseline" / "checkpoints").is_dir()


def test_baseline_only_skips_the_scheduled_run(tmp_path, capsys):
    cfg = write_config(tmp_path, baseline="only")
    assert run("fit", "--config", cfg, "--trainer.max_epochs", "1") == 0
    out = capsys.readouterr().out
    assert "baseline: plain full fine-tuning of every parameter for the trainer's own limits" in out
    assert "scheduled fine-tuning" not in out


def test_the_baseline_uses_the_configs_optimizer_at_baseline_lr(tmp_path):
    seen_optimizers.clear()
    cfg = write_config(tmp_path, baseline="also", baseline_lr=0.003)
    assert run("fit", "--config", cfg, "--model", "test_cli.RecordsOptimizer", "--optimizer", "Adam",
               "--optimizer.lr", "0.01", "--trainer.max_epochs", "1", "--plot", "false") == 0
    # the module's own configure_optimizers would build SGD
    assert seen_optimizers == [("Adam", {0.01}), ("Adam", {0.003})]


def test_fit_without_a_scheduler_in_the_config_adds_one_with_a_generated_schedule(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert run("fit", "--config", cfg, "--trainer.callbacks=[]", "--trainer.max_epochs", "2", "--plot", "false") == 0
    out = capsys.readouterr().out
    assert "added one that generates a schedule from the model" in out
    assert (tmp_path / "lightning_logs" / "version_0" / "ToyWithTest_ft_schedule.yaml").exists()


def test_command_line_overrides_the_config(tmp_path, capsys):
    assert run("fit", "--config", write_config(tmp_path), "--trainer.max_epochs", "2", "--plot", "false") == 0
    out = capsys.readouterr().out
    assert "scheduled fine-tuning: 8 steps" in out


def test_print_config_shows_the_full_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run("fit", "--config", write_config(tmp_path), "--print_config")
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["baseline"] == "none" and printed["trainer"]["max_epochs"] == 4
    assert printed["trainer"]["callbacks"][0]["class_path"] == "phasetune.FinetuningScheduler"


def test_validate_and_test_subcommands_run(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert run("validate", "--config", cfg) == 0
    assert run("test", "--config", cfg) == 0
    assert run("test", "--config", cfg, "--baseline", "also") == 1
    assert "--baseline, --seeds and --test_after_fit apply to fit, not test" in capsys.readouterr().err


# ------------------------------------------------------------------ errors: one line, no traceback
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--config", "no/such/config.yaml"], "no/such/config.yaml"),
        (["--trainer.max_epochz", "3"], "max_epochz"),
        (["--model", "test_cli.NoSuchModel"], "NoSuchModel"),
    ],
)
def test_bad_configs_and_missing_files_are_one_line_errors(tmp_path, capsys, extra, expected):
    assert run("fit", "--config", write_config(tmp_path), *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phasetune: error: ") and expected in err and "\n" not in err


def test_a_misspelled_key_in_the_config_file_is_a_one_line_error(tmp_path, capsys):
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("max_epochs:", "max_epoch:"))
    assert run("fit", "--config", cfg) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("phasetune: error: ") and "max_epoch" in err and "\n" not in err


def test_an_invalid_schedule_stops_fit_with_every_problem(tmp_path, capsys):
    bad = {0: {"params": ["model.haed.*"]}, 1: {"params": ["model.embed.*"], "lr": -1}}
    assert run("fit", "--config", write_config(tmp_path, schedule=bad)) == 1
    err = capsys.readouterr().err
    assert "has 2 problems" in err and "model.haed.*" in err and "'lr'" in err and "Traceback" not in err


# ------------------------------------------------------------------ schedule generate | check | show
def test_schedule_check_accepts_a_good_schedule(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert run("schedule", "check", "--config", cfg) == 0
    assert capsys.readouterr().out.strip().endswith("OK, 3 phases for ToyWithTest")


def test_schedule_check_reports_every_problem_and_exits_1(tmp_path, capsys):
    cfg = write_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("0:\n  params: [model.haed.*]\n1:\n  params: ['model.layers.1.*']\n  lr: zero\n2:\n  parms: []\n")
    assert run("schedule", "check", bad, "--config", cfg) == 1
    err = capsys.readouterr().err
    assert "has 4 problems" in err
    assert "did you mean 'model.head.*'" in err or "model.haed.*" in err
    assert "'lr': 'zero' is not a positive number" in err and "unknown key 'parms'" in err
    assert "Traceback" not in err


def test_schedule_check_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert run("schedule", "check", tmp_path / "nope.yaml", "--config", write_config(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "file not found" in err[1]


def test_schedule_show_is_a_table_of_phases(tmp_path, capsys):
    assert run("schedule", "show", "--config", write_config(tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("phase ")))
    assert lines[header].split() == ["phase", "params", "(tensors)", "trainable", "lr", "ends", "thaws"]
    rows = lines[header + 2: header + 5]
    assert rows[0].split()[:5] == ["0", "34", "(2)", "2.4%", "optimizer's"]
    assert rows[1].split()[:5] == ["1", "608", "(8)", "46.1%", "0.05"]
    assert "early stopping or epoch 1: next phase" in rows[0] and "model.head" in rows[0]
    assert rows[2].split()[:5] == ["2", "752", "(10)", "100.0%", "0.02"] and "early stopping: run ends" in rows[2]


def test_schedule_show_uses_the_callbacks_custom_strategy_adapters(tmp_path, capsys, monkeypatch):
    from phasetune.lightning import adapters

    monkeypatch.setattr(adapters, "_REGISTRY", [])  # no built-in adapter knows SingleDeviceStrategy now
    cfg = write_config(tmp_path)
    assert run("schedule", "show", "--config", cfg) == 1
    assert "allow_untested=True" in capsys.readouterr().err
    config = yaml.safe_load(cfg.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["custom_strategy_adapters"] = {
        "single_device": "phasetune.lightning.adapters.StrategyAdapter"}
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    assert run("schedule", "show", "--config", cfg) == 0
    assert "model.head" in capsys.readouterr().out


def test_schedule_generate_writes_a_schedule_that_checks(tmp_path, capsys):
    cfg = write_config(tmp_path)
    out_file = tmp_path / "generated.yaml"
    assert run("schedule", "generate", "--config", cfg, "--output", out_file) == 0
    generated = yaml.safe_load(out_file.read_text())
    # the default recipe, lpft: the head first, then everything
    assert generated[0] == {"params": [r"model\.head\..*"]} and len(generated) == 2
    assert run("schedule", "check", out_file, "--config", cfg) == 0
    capsys.readouterr()
    assert run("schedule", "generate", "--config", cfg, "--style", "pairs") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# phasetune schedule generated for ToyWithTest (style 'pairs'): 10 phases")
    assert yaml.safe_load(printed)[0] == {"params": ["model.head.bias", "model.head.weight"]}


def test_the_console_script_exits_with_a_message_not_a_traceback(tmp_path):
    script = Path(sys.executable).with_name("phasetune")
    proc = subprocess.run([str(script), "schedule", "check", "--config", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("phasetune: error: ") and "Traceback" not in proc.stderr


def test_schedule_generate_recipe_writes_its_lrs_and_lr_shapes(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert run("schedule", "generate", "--config", cfg, "--recipe", "discriminative", "--lr", "0.01",
               "--lr_decay", "0.5", "--phase_steps", "4", "--include_stem", "false") == 0
    printed = capsys.readouterr().out
    assert "WarmupLinearDecay(optimizer, total_steps=4, warmup_steps=0)" in printed.split("\n0:")[0]
    generated = yaml.safe_load(printed)
    assert [generated[k].get("lr") for k in range(5)] == [None, 0.01, 0.005, 0.0025, 0.00125]
    assert generated[1]["new_lr_scheduler"]["lr_scheduler_init"] == {
        "class_path": "phasetune.lr_shapes.WarmupLinearDecay", "init_args": {"total_steps": 4, "warmup_steps": 0}}
    assert run("schedule", "generate", "--config", cfg, "--recipe", "lpft", "--lr_decay", "0.5") == 2
    assert "lr_decay applies to the 'discriminative' recipe only" in capsys.readouterr().err


def test_fit_with_seeds_prints_mean_sd_per_arm_and_the_paired_difference(tmp_path, capsys):
    cfg = write_config(tmp_path, baseline="also", test_after_fit=True, seeds=2)
    assert run("fit", "--config", cfg, "--trainer.max_epochs", "3", "--plot", "false") == 0
    out = capsys.readouterr().out
    assert "phasetune: seed 0 (1 of 2)" in out and "phasetune: seed 1 (2 of 2)" in out
    summary = out[out.index("phasetune: 2 seeds (0 to 1)"):].splitlines()
    assert summary[1].split()[:4] == ["arm", "seeds", "test_acc", "val_loss"]
    assert re.match(r"scheduled +2 +0\.\d{4} ± 0\.\d{4} ", summary[3])
    assert re.match(r"full fine-tuning +2 +0\.\d{4} ± 0\.\d{4} ", summary[4])
    paired = out[out.index("arm - baseline"):].splitlines()
    assert paired[0].split()[:5] == ["arm", "-", "baseline", "pairs", "Δ"]
    assert re.match(r"scheduled +2 +[+-]0\.\d{4} ± 0\.\d{4} .* \d+\.\d\dx +\d+\.\d\dx$", paired[2])


def test_schedule_generate_splits_a_step_budget_into_max_transition_steps(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert run("schedule", "generate", "--config", cfg, "--recipe", "lpft", "--lr", "0.01", "--steps", "30",
               "--head_fraction", "0.2") == 0
    printed = capsys.readouterr().out
    generated = yaml.safe_load(printed)
    assert [generated[k]["max_transition_step"] for k in (0, 1)] == [6, 30]
    # the implicit default's settings under lpft: phase 0's lr shape is in the schedule too
    assert generated[0]["new_lr_scheduler"]["lr_scheduler_init"]["init_args"] == {"total_steps": 6, "warmup_steps": 1}
    assert generated[1]["new_lr_scheduler"]["lr_scheduler_init"]["init_args"] == {"total_steps": 24,
                                                                                 "warmup_steps": 2}
    assert run("schedule", "generate", "--config", cfg, "--steps", "30", "--phase_steps", "4") == 2
    assert "either --phase_steps" in capsys.readouterr().err


def test_schedule_commands_take_a_hugging_face_model_folder_or_a_model_class(tmp_path, capsys):
    from distributed.hf_scenarios import tiny_bert

    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)
    out = tmp_path / "s.yaml"
    assert run("schedule", "generate", "--model-dir", str(folder), "--recipe", "lpft", "--steps", "40",
               "-o", str(out)) == 0
    generated = yaml.safe_load(out.read_text())
    assert generated[0]["params"] == [r"bert\.pooler\..*", r"classifier\..*"]  # the model's own names
    assert [generated[k]["max_transition_step"] for k in (0, 1)] == [10, 40]  # lpft's head: a quarter by default
    assert run("schedule", "check", str(out), "--model-dir", str(folder)) == 0
    assert "OK, 2 phases for BertForSequenceClassification" in capsys.readouterr().out
    assert run("schedule", "show", "--model", "helpers:Net") == 0  # the generated schedule of Net()
    shown = capsys.readouterr().out
    assert "schedule generated for Net" in shown and "head" in shown
    assert run("schedule", "check", "--model-dir", str(tmp_path)) == 2
    assert "no config.json" in capsys.readouterr().err
    assert run("schedule", "check", "--model", "helpers.Net") == 2
    assert "write module:Class" in capsys.readouterr().err
