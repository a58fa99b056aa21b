"""Schedule files written for finetuning-scheduler (FTS) load unchanged and train what FTS trains.

FTS takes an entry that is not a parameter name as a regex matched with ``re.match`` (a prefix); phasetune
matches whole names. An entry that matches no whole name is taken as a prefix, with one note naming the
whole-name form; an entry whose whole-name and prefix matches differ is refused with both forms named. The
models are built from ``transformers`` config classes (small widths, the real depth and names, random weights).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import yaml

from fts_reference.schedule_compat import SCHEDULES, fts_resolve, model_shapes
from helpers import trainer
from phasetune import FinetuningScheduler, ScheduleError, resolve_schedule

pytest.importorskip("transformers")

FTS_EXAMPLES = [
    "fts_RteBoolqModule_ft_schedule_deberta_base.yaml",
    "fts_RteBoolqModule_ft_schedule_deberta_base_fsdp.yaml",
    "fts_explicit_reinit_lr.yaml",
    "fts_explicit_reinit_optim_lr.yaml",
]
ALTERNATION = "model.classifier.weight|model.classifier.bias|model.albert.pooler"


@functools.cache
def shapes(kind: str) -> dict[str, tuple[int, ...]]:
    return model_shapes(kind)


def fts_sets(path, kind: str) -> dict[int, set[str]]:
    phases, errors = fts_resolve(yaml.safe_load(path.read_text(encoding="utf-8")), list(shapes(kind)))
    assert errors == []
    return {k: set(v) for k, v in phases.items()}


@pytest.mark.parametrize("name", FTS_EXAMPLES)
def test_fts_example_schedules_for_deberta_train_what_fts_trains_without_notes(name):
    path = SCHEDULES / name
    schedule = resolve_schedule(path, shapes("deberta-v3"))
    assert {p.index: set(p.params) for p in schedule} == fts_sets(path, "deberta-v3")
    assert schedule.warnings == ()


def test_fts_generated_albert_schedule_of_exact_names_gives_no_notes():
    path = SCHEDULES / "fts_generated_albert.yaml"
    schedule = resolve_schedule(path, shapes("albert"))
    assert {p.index: set(p.params) for p in schedule} == fts_sets(path, "albert")
    assert schedule.warnings == ()  # an exact name never "also matches" itself


def test_prefix_entries_are_taken_as_fts_takes_them_with_one_note_each_naming_the_whole_name_form():
    path = SCHEDULES / "albert_prefix_style.yaml"
    schedule = resolve_schedule(path, shapes("albert"))
    assert {p.index: set(p.params) for p in schedule} == fts_sets(path, "albert")
    entries = [e for p in schedule for e in p.patterns]
    assert len(schedule.warnings) == len(entries) == 7
    for entry, note in zip(entries, schedule.warnings):
        assert f"'{entry}' matches no parameter name as a whole; taken as a prefix" in note
        assert f"write '{entry}.*' to match them as a whole" in note


def test_the_prefix_note_says_when_the_prefix_also_takes_a_sibling_module():
    schedule = resolve_schedule(SCHEDULES / "albert_prefix_style.yaml", shapes("albert"))
    ffn = "model.albert.encoder.albert_layer_groups.0.albert_layers.0.ffn"
    note = next(w for w in schedule.warnings if f"'{ffn}' matches" in w)
    assert f"'{ffn}_output.weight'" in note and r"ffn\..*' takes module" in note
    assert f"{ffn}_output.weight" in schedule[2].params  # FTS's set, as FTS trains it


def test_an_entry_whose_whole_name_and_prefix_matches_differ_is_refused_naming_both_forms():
    with pytest.raises(ScheduleError) as info:
        resolve_schedule(SCHEDULES / "albert_alternation.yaml", shapes("albert"))
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert "matches 2 parameter names as a whole but 4 as a prefix" in problem
    assert f"write '(?:{ALTERNATION}).*' for those 4 or '(?:{ALTERNATION})$' for the 2 whole-name matches" in problem


def test_both_forms_named_by_the_refusal_resolve_without_notes():
    names = shapes("albert")
    fts_set = {n for n in names if n.startswith(("model.classifier.", "model.albert.pooler."))}
    prefix = resolve_schedule({0: {"params": [f"(?:{ALTERNATION}).*"]}}, names)
    whole = resolve_schedule({0: {"params": [f"(?:{ALTERNATION})$"]}}, names)
    assert set(prefix[0].params) == fts_set and prefix.warnings == ()
    assert set(whole[0].params) == {"model.classifier.weight", "model.classifier.bias"} and whole.warnings == ()


def test_an_fts_prefix_schedule_trains_fts_phase_0_under_the_callback(tmp_path):
    import lightning.pytorch as pl
    import transformers as tf

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = tf.AlbertConfig(vocab_size=128, embedding_size=16, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, num_hidden_layers=2)
            self.model = tf.AlbertForSequenceClassification(config)

        def step(self, batch):
            ids, labels = batch
            return self.model(input_ids=ids, labels=labels).loss

        def training_step(self, batch, batch_idx):
            return self.step(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.step(batch))

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = torch.utils.data.TensorDataset(torch.randint(0, 128, (4, 8), generator=g),
                                                  torch.randint(0, 2, (4,), generator=g))
            return torch.utils.data.DataLoader(data, batch_size=2)

        val_dataloader = train_dataloader

    module = Classifier()
    fts = FinetuningScheduler(ft_schedule=SCHEDULES / "albert_prefix_style.yaml")
    t = trainer(tmp_path, [fts], max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module)
    assert fts.thawed_params == ["model.classifier.weight", "model.classifier.bias"]
    notes = [str(w.message) for w in caught if "taken as a prefix" in str(w.message)]
    assert len(notes) == 7
