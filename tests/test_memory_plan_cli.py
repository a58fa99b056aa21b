"""``phasetune schedule plan``: the memory plan from the command line.

Its output is :func:`phasetune.plan.plan_memory`'s for the same inputs; its exit status says whether every phase
fits (0), a phase does not (1) or the input is bad (2, naming the argument). Plans here simulate the 2-block MLP
of tests/data/plan/plan_models.py (seconds each).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from phasetune.lightning.cli import main
from phasetune.lightning.plan_command import EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_FITS, NO_FLAG, flag
from phasetune.plan import PlanSetup, plan_memory

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "plan"
sys.path.insert(0, str(DATA))
from plan_models import schedule  # noqa: E402

MODEL = "plan_models:small_net"
SMALL = ["--model", MODEL, "--world-size", "4", "--seq-len", "8", "--micro-batch", "2"]
SMALL_KWARGS = {"world_size": 4, "seq_len": 8, "micro_batch": 2}


@pytest.fixture(scope="module")
def schedule_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plan") / "schedule.yaml"
    path.write_text(yaml.safe_dump(schedule(2)))
    return str(path)


@pytest.fixture(scope="module")
def direct(schedule_file):
    """The plan of ``SMALL`` on an 80 GiB device, from plan_memory itself."""
    return plan_memory(schedule_file, MODEL, device_gib=80, **SMALL_KWARGS)


def plan_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["schedule", "plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ output


def test_the_table_is_plan_memorys_table_and_a_fitting_plan_exits_0(capsys, schedule_file, direct):
    code, out, err = plan_cli(capsys, schedule_file, *SMALL, "--device-gib", "80")
    assert code == EXIT_FITS
    # exact: the same code on the same inputs under fake tensors (no values, no timing in the table)
    assert out == direct.table(timing=False) + "\n"
    assert "phase 2 will not fit" not in err


def test_json_is_plan_memorys_dict_for_the_same_settings(capsys, schedule_file):
    code, out, err = plan_cli(
        capsys, schedule_file, "--model", "plan_models:Net", "--model-kwargs", '{"n_layers": 2}', "--world_size", "2",
        "--seq-len", "8", "--micro-batch", "2", "--global-batch", "8", "--mixed-precision", "bf16", "--act-ckpt",
        "--optimizer", "sgd", "--optimizer-kwargs", '{"momentum": 0.9}', "--json", "--quiet",
    )
    expected = plan_memory(schedule_file, "plan_models:Net", model_kwargs={"n_layers": 2}, world_size=2, seq_len=8,
                           micro_batch=2, global_batch=8, mixed_precision="bf16", act_ckpt=True, optimizer="sgd",
                           optimizer_kwargs={"momentum": 0.9})
    data, want = json.loads(out), json.loads(json.dumps(expected.to_dict()))
    assert data.pop("seconds") >= 0 and want.pop("seconds") >= 0  # wall time: the one field two plans differ in
    assert data == want  # exact: same code, same inputs
    assert data["fits"] is None and code == EXIT_FITS  # no --device-gib: nothing to fail
    assert "phasetune plan [" not in err  # --quiet


def test_progress_goes_to_stderr_phase_by_phase(capsys, schedule_file):
    code, out, err = plan_cli(capsys, schedule_file, *SMALL, "--no-micro-batch-search")
    assert code == EXIT_FITS and "phasetune plan" not in out
    progress = [line for line in err.splitlines() if line.startswith("phasetune plan [")]
    assert [line.split("] ", 1)[1].split(" (")[0] for line in progress[2:5]] == [
        "phase 0 planned", "phase 1 planned", "phase 2 planned"]
    assert re.search(r"planned in [\d.]+ s$", progress[-1])


# ------------------------------------------------------------------------------------------ exit status


def test_a_phase_that_does_not_fit_exits_1_naming_each_such_phase(capsys, schedule_file, direct):
    budget = (direct.phases[0].peak + direct.phases[1].peak) // 2  # phase 0 fits, phases 1 and 2 do not
    device = str(1.0 + budget / 2**30)
    code, out, err = plan_cli(capsys, schedule_file, *SMALL, "--device-gib", device, "--reserve-gib", "1",
                              "--fragmentation", "0", "--no-micro-batch-search", "-q")
    assert code == EXIT_DOES_NOT_FIT
    failing = [int(m) for m in re.findall(r"^phasetune: phase (\d) will not fit", err, re.M)]
    assert failing == [1, 2]
    assert out.startswith("Memory plan: Net from plan_models:small_net")  # the table is printed all the same


BAD_INPUTS = {
    "every bad value at once": (
        ["--model", MODEL, "--world-size", "0", "--seq-len", "x", "--strategy", "single", "--cpu-offload"],
        ["5 problems", "--world-size must be an integer >= 1, got 0", "--seq-len must be an integer, got 'x'",
         "--strategy 'single' runs on one device", "--cpu-offload is planned for FSDP2 only",
         "SCHEDULE 'no-such.yaml': no such file"]),
    "a misspelt flag": (["--model", MODEL, "--seqlen", "8"], ["--seqlen: did you mean --seq-len?"]),
    "no model": ([], ["one of the arguments --model-dir --model is required"]),
    "a missing config": (["--model-dir", "no/such/config.json"], ["--model-dir 'no/such/config.json': no such file"]),
    "a config field it lacks": (["--model-dir", str(DATA / "tiny_llama.json"), "--model-kwargs", '{"num_layers": 2}'],
                                ["--model-kwargs 'num_layers'", "did you mean 'num_hidden_layers'?"]),
    "factory arguments it refuses": (["--model", MODEL, "--model-kwargs", '{"depth": 3}'],
                                     ["--model-kwargs: small_net() cannot take them"]),
    "a batch that does not divide": (["--model", MODEL, "--global-batch", "7", "--micro-batch", "2", "--world-size", "2"],
                                     ["--global-batch 7 is not a multiple of --micro-batch * --world-size = 4; use 4"]),
    "kwargs that are not a mapping": (["--model", MODEL, "--optimizer-kwargs", "[1, 2]"],
                                      ["--optimizer-kwargs must be a mapping"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_naming_the_argument_and_the_fix(capsys, schedule_file, case):
    args, fragments = BAD_INPUTS[case]
    sched = "no-such.yaml" if case == "every bad value at once" else schedule_file
    code, out, err = plan_cli(capsys, sched, *args)
    assert code == EXIT_BAD_INPUT and out == ""
    for fragment in fragments:
        assert fragment in err, err


def test_a_schedule_that_does_not_match_the_model_exits_2_naming_the_phase(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({0: {"params": ["head.*"]}, 1: {"params": [r"nothing\..*"]}}))
    code, _, err = plan_cli(capsys, str(path), "--model", MODEL, "-q")
    assert code == EXIT_BAD_INPUT
    assert f"SCHEDULE {path}: phase 1, key 'params'" in err and "matches no parameter" in err


# ------------------------------------------------------------------------------------------ help


def test_help_lists_a_flag_for_every_plan_setting(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["schedule", "plan", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    settings = [name for name in PlanSetup.__dataclass_fields__ if name not in NO_FLAG]
    missing = [flag(name) for name in settings if flag(name) not in text]
    assert not missing
    for option in ("--model-dir", "--model ", "--model-kwargs", "--inputs", "--loss", "--json", "--unit", "--quiet",
                   "exit status: 0"):
        assert option in text


def test_schedule_help_lists_the_plan_command(capsys):
    with pytest.raises(SystemExit):
        main(["schedule", "--help"])
    assert "phasetune schedule plan [SCHEDULE]" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ recorded plans


def test_a_plan_read_back_from_its_json_prints_the_same_table(capsys, schedule_file, direct):
    from phasetune.plan import MemoryPlan

    recorded = json.loads(json.dumps(direct.to_dict()))
    assert MemoryPlan.from_dict(recorded).table(timing=False) == direct.table(timing=False)  # exact: same numbers
    assert recorded["schedule"] == schedule_file


#: plans recorded with --json (the 8B plans take minutes): full layers, and LoRA then the top blocks
RECORDED = [ROOT / "bench" / "plan_configs" / name for name in ("llama3_8b_plan.json", "llama3_8b_lora_plan.json")]
PLAN_BLOCK = re.compile(r"^```text\n\$ (phasetune schedule plan [^\n]+)\n(.*?)^```$", re.M | re.S)


@pytest.mark.parametrize("doc", ["docs/memory_plan.md", "README.md"])
def test_shown_plan_output_is_the_real_output_of_the_command_shown(doc, monkeypatch):
    """A ```text block starting ``$ phasetune schedule plan ...`` shows what that command prints (run from the
    repository root; a last line ``...`` shows the first lines only): for bad input, its error, from the command
    itself; for a plan, the table of the plan it
    recorded with --json for the command's schedule (:data:`RECORDED`), checked to be made with the same schedule,
    model and settings as the command."""
    import shlex

    from phasetune.lightning.plan_command import plan_arguments, plan_parser
    from phasetune.lightning.schedule_command import UsageError
    from phasetune.plan import MemoryPlan

    shown = PLAN_BLOCK.findall((ROOT / doc).read_text(encoding="utf-8"))
    if doc == "README.md" and not shown:
        pytest.skip("README.md shows no plan output")
    assert shown, f"{doc} shows no `$ phasetune schedule plan` output"
    monkeypatch.chdir(ROOT)
    recorded_plans = {r["schedule"]: r for r in (json.loads(path.read_text()) for path in RECORDED)}
    for command, output in shown:
        args = plan_parser().parse_args(shlex.split(command)[3:])
        try:
            sched, model, kwargs = plan_arguments(args)
        except UsageError as e:
            assert output == f"phasetune: error: {e}\n", f"{doc} shows another error than `{command}` gives:\n{e}"
            continue
        assert sched in recorded_plans, f"no plan recorded for {sched} (record one with --json: {RECORDED})"
        recorded = recorded_plans[sched]
        source = recorded["model"].split(" from ", 1)[1].removesuffix(" with the schedule's LoRA adapters")
        assert source == model, command
        settings = {k: v for k, v in kwargs.items() if k in PlanSetup.__dataclass_fields__}
        expected_setup = MemoryPlan(PlanSetup(**settings), "", 0, [], None).to_dict()["setup"]
        assert recorded["setup"] == json.loads(json.dumps(expected_setup)), command
        table = MemoryPlan.from_dict(recorded).table(args.unit, timing=False) + "\n"
        if output.endswith("\n...\n"):  # the first lines of the output, then "..."
            output, table = output[:-4], table[: len(output) - 4]
        assert output == table, f"{doc} shows stale output of `{command}`; the recorded plan prints:\n{table}"


# ------------------------------------------------------------------------------------------ the fit-start check
# (phasetune.plan.fit_check: what a front end calls before phase 0; here beside the command that shares its output)


def tiny_llama():
    from transformers import AutoConfig, LlamaForCausalLM

    raw = json.loads((DATA / "tiny_llama.json").read_text())
    return LlamaForCausalLM(AutoConfig.for_model(raw.pop("model_type"), **raw))


class Wrapper(torch.nn.Module):
    """A LightningModule's shape: the Hugging Face model as ``self.model``."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def test_a_built_hugging_face_model_is_planned_from_its_config_naming_its_own_class():
    from phasetune.plan import model_for_plan

    model = tiny_llama()
    model.config.architectures = ["LlamaForSequenceClassification"]  # a checkpoint's class, not this model's
    config, prefix = model_for_plan(model)
    assert (config.architectures, prefix) == (["LlamaForCausalLM"], "")
    assert model.config.architectures == ["LlamaForSequenceClassification"]  # the run's config is left alone
    config, prefix = model_for_plan(Wrapper(model))
    assert (config.architectures, prefix) == (["LlamaForCausalLM"], "model")


def test_a_model_the_plan_cannot_rebuild_asks_for_a_factory():
    from torch import nn

    from phasetune import ConfigurationError
    from phasetune.plan import model_for_plan

    wrapper = Wrapper(tiny_llama())
    wrapper.extra = nn.Linear(2, 2)  # parameters of its own: the config alone does not rebuild them
    for module in (nn.Linear(2, 2), wrapper):
        with pytest.raises(ConfigurationError, match=re.escape("'package.module:factory'")):
            model_for_plan(module)


def test_the_fit_check_raises_naming_each_phase_that_will_not_fit(schedule_file, direct):
    from phasetune import ConfigurationError
    from phasetune.plan import check_fit

    budget = (direct.phases[0].peak + direct.phases[1].peak) // 2  # phase 0 fits, phases 1 and 2 do not
    tight = {"device_gib": 1.0 + budget / 2**30, "reserve_gib": 1.0, "fragmentation": 0.0, "search_micro_batch": False}
    with pytest.raises(ConfigurationError) as e:
        check_fit(schedule_file, MODEL, isolated=False, **tight, **SMALL_KWARGS)
    assert [p.split(":")[0] for p in e.value.problems[:2]] == ["phase 1 will not fit", "phase 2 will not fit"]
    assert "before phase 0" in e.value.problems[-1]
    plan = check_fit(schedule_file, MODEL, isolated=False, device_gib=80, search_micro_batch=False, **SMALL_KWARGS)
    assert plan.fits is True
