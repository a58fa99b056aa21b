"""The prefix cache as a per-phase schedule option (phasetune.features.prefix_cache.phases): the key's checks, the controller
driven around a real PhaseRun, and agreement with the same run with the prefix in eval mode and no cache
(numerical: a cached row was computed in another batch)."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import float32_drift
from phasetune.core.schedule import diff_fingerprints, param_shapes, resolve_schedule
from phasetune.errors import ScheduleError
from phasetune.features.prefix_cache.cache import INDEX_KEY, IndexedDataset, PrefixCacheError
from phasetune.features.prefix_cache.phases import PrefixCachePhases
from phasetune.run import PhaseRun, RunEnv, RunOptions


class Stack(nn.Module):
    """stem (Linear + BatchNorm + Dropout) -> 3 blocks -> head; dropout in the suffix too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.2)) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class Wrapper(nn.Module):
    """Like a LightningModule whose training_step calls ``self.model(**batch)``: its own forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Stack()

    def training_step(self, batch: dict) -> torch.Tensor:
        return self.model(x=batch["x"])


NAMES = [n for n, _ in Stack().named_parameters()]
TWO_PHASES = {  # phase 0: blocks.2 + head (prefix up to blocks.1); phase 1 thaws blocks.1 (prefix up to blocks.0)
    0: {"params": [r"head\..*", r"blocks\.2\..*"], "prefix_cache": {"limit_mb": 0}},
    1: {"params": [r"blocks\.1\..*"], "lr": 0.1, "prefix_cache": True},
}


def problems_of(schedule: dict) -> list[str]:
    with pytest.raises(ScheduleError) as info:
        resolve_schedule(schedule, NAMES)
    return info.value.problems


# ------------------------------------------------------------------------------------------ the schedule key
@pytest.mark.parametrize(("value", "expected"), [
    ("yes", "phase 1, key 'prefix_cache': expected true, false or a mapping"),
    ({"prefix_ends": "stem"}, "unknown sub-key 'prefix_ends'; did you mean 'prefix_end'? (valid: prefix_end, "
                              "limit_mb, deterministic_inputs)"),
    ({"limit_mb": -1}, "phase 1, key 'prefix_cache', 'limit_mb': -1 is not an integer >= 0"),
    ({"limit_mb": 1.5}, "'limit_mb': 1.5 is not an integer >= 0"),
    ({"deterministic_inputs": "no"}, "'deterministic_inputs': expected true or false, got 'no'"),
    ({"prefix_end": ""}, "'prefix_end': expected a non-empty module name"),
    ({"prefix_end": "blocks.9"}, "'prefix_end': 'blocks.9' is not a module with parameters; did you mean"),
    ({"prefix_end": "blocks.2"}, "the prefix up to 'blocks.2' holds 'blocks.2.0.weight', 'blocks.2.0.bias', which "
                                 "train in this phase"),
])
def test_each_bad_prefix_cache_value_is_reported_with_its_phase_and_key(value, expected):
    problems = problems_of({0: {"params": [r"head\..*"]}, 1: {"params": [r"blocks\.2\..*"], "prefix_cache": value}})
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_phase_where_every_parameter_trains_refuses_the_cache_and_all_problems_come_together():
    problems = problems_of({0: {"params": [r"head\..*"], "prefix_cache": {"limit_mb": -2}},
                            1: {"params": [r"(stem|blocks)\..*"], "prefix_cache": True}})
    assert len(problems) == 2
    assert "phase 0, key 'prefix_cache', 'limit_mb'" in problems[0]
    assert problems[1].startswith("phase 1, key 'prefix_cache': every parameter trains in this phase")


def test_the_key_round_trips_and_stays_out_of_the_resume_fingerprint(tmp_path):
    three = TWO_PHASES | {2: {"params": [r"blocks\.0\..*"], "prefix_cache": False}}
    schedule = resolve_schedule(three, NAMES)
    assert [p.prefix_cache for p in schedule] == [{"limit_mb": 0}, {}, None]
    written = yaml.safe_load(schedule.dump(tmp_path / "s.yaml").read_text())
    assert written[0]["prefix_cache"] == {"limit_mb": 0} and written[1]["prefix_cache"] is True
    assert "prefix_cache" not in written[2]
    again = resolve_schedule(tmp_path / "s.yaml", NAMES)
    assert again.to_dict() == schedule.to_dict()
    plain = resolve_schedule({k: {**v, "prefix_cache": False} for k, v in three.items()}, NAMES)
    assert diff_fingerprints(schedule.fingerprint(), plain.fingerprint()) == ([], [])


# ------------------------------------------------------------------------------------------ the controller's checks
def test_the_controller_reports_what_needs_the_model_and_the_argument_form_in_one_error():
    model = Stack()
    schedule = resolve_schedule({0: {"params": [r"stem\..*"], "prefix_cache": True}, 1: {"params": [r"head\..*"]}},
                                NAMES)
    with pytest.raises(PrefixCacheError) as info:
        PrefixCachePhases(schedule, model, overrides={1: {"limit_mb": "big"}, 7: True}, sharded="FSDP2")
    problems = info.value.problems
    assert any(p.startswith("prefix_cache argument: 7 is not a phase of the schedule (phases 0..1)") for p in problems)
    assert any("phase 1 (prefix_cache argument), key 'prefix_cache', 'limit_mb': 'big'" in p for p in problems)
    assert any("but the model is sharded (FSDP2)" in p for p in problems)
    # phase 0 trains the stem, the first module: no frozen block lies below what trains
    assert any(p.startswith("phase 0, key 'prefix_cache': no frozen block lies below") for p in problems)


def test_a_compiled_model_is_refused_naming_the_setting():
    schedule = resolve_schedule(TWO_PHASES, NAMES)
    model = Stack()
    model.compile()  # lazily: nothing compiles before a forward
    with pytest.raises(PrefixCacheError, match=r"prefix_cache is on in phases 0, 1, but the model runs through "
                                               r"torch\.compile"):
        PrefixCachePhases(schedule, model)


def test_overrides_turn_a_phase_on_or_off_and_find_the_prefix():
    schedule = resolve_schedule(TWO_PHASES, NAMES)
    caches = PrefixCachePhases(schedule, Stack(), overrides={0: False, 1: {"prefix_end": "stem"}}, info=lambda s: None)
    assert caches.settings == {0: None, 1: {"prefix_end": "stem"}}
    assert caches.prefix_ends == {1: "stem"}
    caches.close()
    found = PrefixCachePhases(schedule, Stack(), info=lambda s: None)
    assert found.prefix_ends == {0: "blocks.1", 1: "blocks.0"}
    found.close()


# ------------------------------------------------------------------------------------------ a run, by hand
def data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def run_two_phases(tmp_path, cached: bool) -> tuple[dict[str, torch.Tensor], list]:
    """Phase 0 for 3 epochs, phase 1 for 2, SGD; with the controller, or with the same prefixes put in eval mode."""
    model = Stack()
    run = PhaseRun(TWO_PHASES, dict(model.named_parameters()), param_shapes(model.named_parameters()),
                   options=RunOptions(restore_best=False), env=RunEnv(info=lambda s: None, warn=lambda s: None), model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run.fit_optimizer(opt, [])
    run.start(epoch=0, step=0)
    dataset = IndexedDataset(data())
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    lines: list = []
    caches = PrefixCachePhases(run.schedule, model, spill_dir=tmp_path, dataset=dataset, chunk_bytes=256,
                               info=lines.append) if cached else None
    eval_prefix = {0: [model.stem, model.blocks[0], model.blocks[1]], 1: [model.stem, model.blocks[0]]}
    if caches:
        caches.enter(run.depth)
    torch.manual_seed(7)
    for epoch in range(5):
        if epoch == 3:
            if caches:
                files = caches.cache.spill_files()
                assert files and all(f.exists() for f in files)  # limit_mb: 0, so phase 0 spilled everything
                lines.append(("left", caches.leave()))
                assert not any(f.exists() for f in files) and not any(tmp_path.iterdir())
            run.transition(epoch=epoch, step=None, reason="test", optimizer=opt, schedulers=[])
            if caches:
                caches.enter(run.depth)
        model.train()
        if not caches:
            for m in eval_prefix[run.depth]:
                m.eval()
        for batch in loader:
            x, y = caches.before_batch(batch) if caches else batch[0]
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    if caches:
        lines.append(("left", caches.leave()))
        caches.close()
    return {n: p.detach().clone() for n, p in model.state_dict().items()}, lines


@pytest.mark.numerical
def test_a_cached_two_phase_run_ends_where_the_eval_prefix_run_does_and_drops_its_spill_files(tmp_path):
    cached, lines = run_two_phases(tmp_path, cached=True)
    plain, _ = run_two_phases(tmp_path, cached=False)
    for name, value in plain.items():  # numerical: cached rows from other batches; 5 epochs of 5 steps, sums of 8
        torch.testing.assert_close(cached[name], value, rtol=0, atol=float32_drift(25, 8), msg=name)
    assert lines[0].startswith("phase 0: prefix cache up to blocks.1 (prefix in eval mode: dropout off, BatchNorm "
                               "statistics frozen); up to 0 B in RAM")
    left = [line for tag, line in (x for x in lines if isinstance(x, tuple))]
    # 5 batches per epoch: the first epoch computes them, and so does the first batch of the second (it checks the
    # stored outputs against fresh ones); the rest are served from the cache
    assert left[0].startswith("phase 0: prefix cache up to blocks.1") and "40 samples" in left[0]
    assert "9 batches served from it, 6 computed" in left[0]
    assert left[1].startswith("phase 1: prefix cache up to blocks.0") and "4 batches served from it, 6 computed" in left[1]
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ batches and forwards
def dict_loader() -> DataLoader:
    x, y = data().tensors
    items = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    return DataLoader(IndexedDataset(items), batch_size=8)


def test_a_training_step_that_calls_an_inner_model_is_served_and_never_sees_the_index():
    wrapper = Wrapper()
    schedule = resolve_schedule({0: {"params": [r"model\.head\..*"], "prefix_cache": True}},
                                [n for n, _ in wrapper.named_parameters()])
    wrapper.requires_grad_(False)
    wrapper.model.head.requires_grad_(True)
    caches = PrefixCachePhases(schedule, wrapper, info=lambda s: None)
    caches.enter(0)
    wrapper.train()
    for _ in range(2):
        for batch in dict_loader():
            assert caches.before_batch(batch) is batch and INDEX_KEY not in batch  # stripped in place
            wrapper.training_step(batch).sum().backward()
    assert caches.cache.batches_served == 4 and caches.cache.batches_computed == 6  # 1 to check the stored ones
    caches.close()


def test_a_model_called_with_the_index_as_a_keyword_gets_it_removed_in_phases_without_a_cache():
    model = Stack()
    schedule = resolve_schedule({0: {"params": [r"head\..*"], "prefix_cache": True}, 1: {"params": [r"blocks\..*"]}},
                                NAMES)
    caches = PrefixCachePhases(schedule, model, info=lambda s: None)
    caches.enter(1)  # as the Hugging Face Trainer calls it: model(**inputs), no before_batch
    batch = next(iter(dict_loader()))
    assert model(x=batch["x"], sample_index=batch[INDEX_KEY]).shape == (8, 2)
    caches.close()
    with pytest.raises(TypeError, match="sample_index"):
        model(x=batch["x"], sample_index=batch[INDEX_KEY])


def test_without_a_cached_phase_the_controller_leaves_batches_alone():
    schedule = resolve_schedule({0: {"params": [r"head\..*"]}}, NAMES)
    caches = PrefixCachePhases(schedule, Stack())
    caches.enter(0)
    batch = {"x": torch.zeros(2, 6), INDEX_KEY: torch.arange(2)}
    assert caches.before_batch(batch) is batch and INDEX_KEY in batch and not caches.active and not caches.enabled
    assert caches.leave() is None
    caches.close()


def test_the_controller_example_in_docs_prefix_cache_md_runs_and_caches_phase_0_only(run_doc_example):
    lines = run_doc_example("prefix_cache.md", "test_prefix_phases.py")
    assert len(lines) == 2 and lines[0].startswith("phase 0: prefix cache up to 2 (prefix in eval mode")
    assert lines[1].startswith("phase 0: prefix cache up to 2") and "256 samples" in lines[1]
    assert lines[1].endswith("7 batches served from it, 9 computed")  # 8 filling, 1 checking a stored sample


class RandomCrop:
    """Stands in for torchvision's random transform (the check goes by class name)."""


def test_a_training_set_with_a_random_transform_is_refused_before_training_unless_declared_deterministic():
    schedule = resolve_schedule(TWO_PHASES, NAMES)
    dataset = IndexedDataset(data())
    dataset.dataset.transform = RandomCrop()
    with pytest.raises(PrefixCacheError) as info:
        PrefixCachePhases(schedule, Stack(), dataset=dataset)
    assert [p.split(":")[0] for p in info.value.problems] == ["phase 0, key 'prefix_cache'", "phase 1, key 'prefix_cache'"]
    assert "applies random transforms (RandomCrop)" in info.value.problems[0]
    overrides = {k: {"deterministic_inputs": True} for k in (0, 1)}
    PrefixCachePhases(schedule, Stack(), dataset=dataset, overrides=overrides, info=lambda s: None).close()
