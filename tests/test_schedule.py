"""Schedule loading, validation and resolution, without a Trainer."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from phasetune import ScheduleError, resolve_schedule
from phasetune.core.schedule import diff_fingerprints

NAMES = [
    "model.embed.weight",
    "model.embed.bias",
    *[f"model.layers.{i}.{m}.{p}" for i in range(12) for m in ("norm", "lin") for p in ("weight", "bias")],
    "model.head.weight",
    "model.head.bias",
]


def write(tmp_path, text: str):
    path = tmp_path / "sched.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(source, names=NAMES, **kw) -> list[str]:
    with pytest.raises(ScheduleError) as info:
        resolve_schedule(source, names, **kw)
    return info.value.problems


def test_yaml_file_resolves_exact_names_and_regexes_in_registration_order(tmp_path):
    path = write(
        tmp_path,
        r"""
        0:
          params: [model.head.weight, model.head.bias]
          max_transition_epoch: 2
        1:
          params: ['model\.layers\.11\..*']
          lr: 1.0e-4
        2:
          params: ['model\.layers\.([0-9]|10)\..*', model.embed.*]
        """,
    )
    s = resolve_schedule(path, NAMES)
    assert len(s) == 3
    assert s[0].params == ("model.head.weight", "model.head.bias")
    assert s[0].max_transition_epoch == 2
    assert s[1].lr == 1e-4  # exact: the decimal parses to the double the literal is
    assert s[1].params == tuple(n for n in NAMES if n.startswith("model.layers.11."))
    assert s[2].params[:2] == ("model.embed.weight", "model.embed.bias")  # registration order, not entry order
    assert len(s[2].params) == 2 + 11 * 4
    assert s.unscheduled == ()
    assert s.params_through(1) == list(s[0].params + s[1].params)  # thawing is cumulative


def test_dict_schedule_with_string_keys_and_yaml11_exponent_lr():
    s = resolve_schedule({"0": {"params": ["model.head.*"]}, "1": {"params": ["model.embed.*"], "lr": "1e-5"}}, NAMES)
    assert s[1].lr == 1e-5  # exact: the decimal parses to the double the literal is


def test_unscheduled_parameters_are_listed():
    s = resolve_schedule({0: {"params": ["model.head.*"]}}, NAMES)
    assert len(s.unscheduled) == len(NAMES) - 2
    assert "model.embed.weight" in s.unscheduled


def test_non_integer_phase_keys_are_reported():
    found = problems({0: {"params": ["model.head.*"]}, "one": {"params": ["model.embed.*"]}, 1.5: {"params": []}})
    assert any("phase key 'one'" in p and "non-negative integer" in p for p in found)
    assert any("phase key 1.5" in p for p in found)


def test_non_contiguous_phase_keys_are_reported():
    found = problems({0: {"params": ["model.head.*"]}, 2: {"params": ["model.embed.*"]}})
    assert any("contiguous from 0; missing 1" in p for p in found)


def test_entry_that_matches_only_as_a_prefix_is_taken_as_fts_does_with_a_note_naming_dot_star():
    s = resolve_schedule({0: {"params": ["model.head"]}}, NAMES)
    assert s[0].params == ("model.head.weight", "model.head.bias")
    assert len(s.warnings) == 1
    assert "phase 0, key 'params'" in s.warnings[0] and "'model.head.*'" in s.warnings[0]


def test_unmatched_entry_with_a_typo_suggests_the_close_name():
    found = problems({0: {"params": ["model.haed.weight"]}})
    assert "did you mean 'model.head.weight'" in found[0]


def test_invalid_regex_is_reported_with_the_regex_error():
    found = problems({0: {"params": ["model.head.(weight"]}})
    assert "neither a parameter name nor a valid regex" in found[0]


def test_parameter_in_two_phases_names_both_phases_and_explains_the_dot_trap():
    found = problems({0: {"params": ["model.layers.10.*"]}, 1: {"params": ["model.layers.1.*"]}})
    assert len(found) == 1  # one problem for the clashing pair of entries, listing the tensors
    first = found[0]
    assert first.startswith("phase 1, key 'params': 4 parameters 'model.layers.10.norm.weight', ")
    assert "(matched by 'model.layers.1.*') already in phase 0 (matched by 'model.layers.10.*')" in first
    assert r"write 'model\.layers\.1\..*'" in first  # how to write what was meant, as it would be typed


def test_unknown_key_gets_did_you_mean():
    found = problems({0: {"params": ["model.head.*"], "max_transition_epochs": 3}})
    assert found == ["phase 0: unknown key 'max_transition_epochs'; did you mean 'max_transition_epoch'?"]


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ({"params": "model.head.*"}, "expected a list, got the string"),
        ({"params": [3]}, "is a int, not a string"),
        ({"params": []}, "the list is empty"),
        ({}, "missing key 'params'"),
        ({"params": ["model.head.*"], "max_transition_epoch": "2"}, "not an integer >= -1"),
        ({"params": ["model.head.*"], "max_transition_epoch": True}, "not an integer >= -1"),
        (["model.head.*"], "expected a mapping with 'params'"),
    ],
)
def test_wrong_types_name_phase_and_key(phase, expected):
    found = problems({0: phase})
    assert any(expected in p and p.startswith("phase 0") for p in found), found


@pytest.mark.parametrize("lr", [0, -1e-5, "fast", float("nan"), True])
def test_lr_must_be_a_positive_number(lr):
    found = problems({0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"], "lr": lr}})
    assert any(p.startswith("phase 1, key 'lr'") and "not a positive number" in p for p in found), found


def test_lr_in_phase_zero_is_refused_with_the_fix():
    found = problems({0: {"params": ["model.head.*"], "lr": 1e-3}})
    assert "set its learning rate there" in found[0]


def test_epoch_transitions_only_needs_a_fixed_length_in_every_phase():
    found = problems(
        {0: {"params": ["model.head.*"], "max_transition_epoch": 2}, 1: {"params": ["model.embed.*"]},
         2: {"params": ["model.layers.0.*"], "max_transition_step": 40}},
        epoch_transitions_only=True,
    )
    assert found == [
        "phase 1: epoch_transitions_only=True needs 'max_transition_epoch' >= 1 or 'max_transition_step' >= 1 in "
        "every phase (where the phase ends; early stopping never ends one)"
    ]


def test_max_transition_epochs_must_increase():
    found = problems(
        {0: {"params": ["model.head.*"], "max_transition_epoch": 3}, 1: {"params": ["model.embed.*"], "max_transition_epoch": 3}}
    )
    assert "not after phase 0's 3" in found[0]


def test_duplicate_yaml_keys_are_reported_with_lines(tmp_path):
    path = write(
        tmp_path,
        """
        0:
          params: [model.head.weight]
          params: [model.head.bias]
        0:
          params: [model.embed.weight]
        """,
    )
    found = problems(path)
    assert len(found) == 2
    assert any("line 4: duplicate key 'params' (first defined at line 3)" in p for p in found)
    assert any("line 5: duplicate key 0 (first defined at line 2)" in p for p in found)


def test_missing_file(tmp_path):
    found = problems(tmp_path / "nope.yaml")
    assert "file not found" in found[0] and "nope.yaml" in found[0]


def test_unreadable_sources(tmp_path):
    assert "is a directory" in problems(tmp_path)[0]
    assert "not valid YAML" in problems(write(tmp_path, "0: [unclosed\n"))[0]
    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert "cannot read" in problems(bad)[0]
    assert "is empty" in problems(write(tmp_path, "# only a comment\n"))[0]
    assert "must be a mapping" in problems(write(tmp_path, "- a\n- b\n"))[0]


def test_all_problems_are_reported_at_once():
    found = problems(
        {
            0: {"params": ["model.haed.*"], "lrr": 1},
            1: {"params": ["model.embed.*"], "lr": -1},
            3: {"params": ["model.layers.0.*"]},
        }
    )
    assert len(found) == 4
    with pytest.raises(ScheduleError, match="has 4 problems"):
        resolve_schedule({0: {"params": ["model.haed.*"], "lrr": 1}, 1: {"params": ["model.embed.*"], "lr": -1},
                          3: {"params": ["model.layers.0.*"]}}, NAMES)


def test_loose_dots_that_match_extra_modules_give_a_warning_not_an_error():
    s = resolve_schedule({0: {"params": ["model.head.*"]}, 1: {"params": ["model.layers.1.*"]}}, NAMES)
    assert len(s[1].params) == 12  # layers 1, 10 and 11
    assert any("also matches 'model.layers.10.norm.weight'" in w for w in s.warnings)


def test_dump_round_trips_the_resolved_schedule(tmp_path):
    s = resolve_schedule({0: {"params": ["model.head.*"], "max_transition_epoch": 1},
                          1: {"params": ["model.layers.11.*"], "lr": 2e-5}}, NAMES)
    path = s.dump(tmp_path / "out" / "resolved.yaml", header="test")
    text = path.read_text()
    assert text.startswith("# test\n")
    assert yaml.safe_load(text)[1]["params"] == list(s[1].params)
    again = resolve_schedule(path, NAMES)
    assert again.phases == s.phases or [p.params for p in again] == [p.params for p in s]
    assert [p.lr for p in again] == [None, 2e-5]


def test_fingerprint_diff_separates_blocking_and_benign_changes():
    shapes = {n: (4,) for n in NAMES}
    a = resolve_schedule({0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"], "lr": 1e-5}}, shapes)
    b = resolve_schedule({0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"], "lr": 3e-5}}, shapes)
    c = resolve_schedule({0: {"params": ["model.head.weight"]}, 1: {"params": ["model.embed.*"]}}, shapes)
    blocking, benign = diff_fingerprints(a.fingerprint(), b.fingerprint())
    assert blocking == [] and benign == ["phase 1 lr: checkpoint 1e-05, now 3e-05"]
    blocking, _ = diff_fingerprints(a.fingerprint(), c.fingerprint())
    assert blocking == ["phase 0 trains different parameters: no longer 'model.head.bias'"]
    other_model = {**shapes, "model.head.weight": (5,)}
    d = resolve_schedule({0: {"params": ["model.head.*"]}, 1: {"params": ["model.embed.*"], "lr": 1e-5}}, other_model)
    blocking, _ = diff_fingerprints(a.fingerprint(), d.fingerprint())
    assert blocking == ["parameter 'model.head.weight' has shape [4] in the checkpoint, [5] now"]


# ------------------------------------------------------------------ new_optimizer / new_lr_scheduler keys
def test_optimizer_and_scheduler_specs_are_validated_before_training():
    found = problems(
        {
            0: {"params": ["model.head.*"], "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.AdamW"}}},
            1: {"params": ["model.layers.0.*"], "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.Adamm"}}},
            2: {"params": ["model.layers.1.*"], "new_optimizer": {"optimizer_init": {"class_path": "torch.nn.Linear"}}},
            3: {"params": ["model.layers.2.*"],
                "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentm": 0.9}}}},
            4: {"params": ["model.layers.3.*"],
                "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "StepLR", "init_args": {}}}},
            5: {"params": ["model.layers.4.*"],
                "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "torch.optim.SGD"}, "pl_lrs_cfg": {"interval": "batch"}}},
            6: {"params": ["model.layers.5.*"],
                "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "ReduceLROnPlateau"}}},
        }
    )
    text = "\n".join(found)
    assert "phase 0, key 'new_optimizer': phase 0 uses the optimizer from configure_optimizers" in text
    assert "phase 1, key 'new_optimizer', 'optimizer_init': cannot import 'torch.optim.Adamm'" in text
    assert "phase 2, key 'new_optimizer', 'optimizer_init': 'torch.nn.Linear' is not a subclass of torch.optim.optimizer.Optimizer" in text
    assert "phase 3, key 'new_optimizer', 'optimizer_init': torch.optim.SGD(**init_args) failed: TypeError" in text
    assert "momentm" in text
    assert "phase 4, key 'new_lr_scheduler', 'lr_scheduler_init': StepLR(**init_args) failed: TypeError" in text
    assert "phase 5, key 'new_lr_scheduler', 'lr_scheduler_init': 'torch.optim.SGD' is not a subclass" in text
    assert "phase 5, key 'new_lr_scheduler', 'pl_lrs_cfg': interval must be 'epoch' or 'step', got 'batch'" in text
    assert "phase 6, key 'new_lr_scheduler': ReduceLROnPlateau needs the metric it watches" in text
    assert len(found) == 8


def test_nested_sequential_scheduler_spec_is_accepted():
    s = resolve_schedule(
        {
            0: {"params": ["model.head.*"]},
            1: {
                "params": ["model.embed.*"],
                "new_lr_scheduler": {
                    "lr_scheduler_init": {
                        "class_path": "torch.optim.lr_scheduler.SequentialLR",
                        "init_args": {
                            "schedulers": [
                                {"class_path": "LinearLR", "init_args": {"start_factor": 0.1, "total_iters": 2}},
                                {"class_path": "CosineAnnealingLR", "init_args": {"T_max": 10}},
                            ],
                            "milestones": [2],
                        },
                    },
                    "pl_lrs_cfg": {"interval": "step"},
                    "use_current_optimizer_pg_lrs": True,
                },
            },
        },
        NAMES,
    )
    spec = s[1].new_lr_scheduler
    assert spec.use_current_optimizer_pg_lrs and spec.pl_lrs_cfg == {"interval": "step"}
    assert yaml.safe_load(s.to_yaml())[1]["new_lr_scheduler"]["lr_scheduler_init"]["class_path"].endswith("SequentialLR")
