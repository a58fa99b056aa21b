"""Implicit schedule generation."""

from __future__ import annotations

import itertools

import pytest
from torch import nn

from helpers import Net, lr_approx
from phasetune import generate_schedule, resolve_schedule
from phasetune.core.generate import find_blocks


class BertLike(nn.Module):
    """Shaped like Hugging Face BertForSequenceClassification (embeddings, encoder.layer.N, pooler, classifier)."""

    _no_split_modules = ["Layer"]

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = nn.Module()
        self.bert.embeddings.word_embeddings = nn.Embedding(10, 4)
        self.bert.embeddings.position_embeddings = nn.Embedding(10, 4)
        self.bert.embeddings.LayerNorm = nn.LayerNorm(4)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(Layer() for _ in range(n))
        self.bert.pooler = nn.Module()
        self.bert.pooler.dense = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Linear(4, 4)
        self.output = nn.Linear(4, 4)


def test_blocks_style_keeps_modules_whole_head_first_then_blocks_top_down_then_stem():
    s = generate_schedule(Net(n_layers=4), "blocks")
    assert s == {
        0: {"params": [r"head\..*"]},
        1: {"params": [r"layers\.3\..*"]},
        2: {"params": [r"layers\.2\..*"]},
        3: {"params": [r"layers\.1\..*"]},
        4: {"params": [r"layers\.0\..*"]},
        5: {"params": [r"embed\..*"]},
    }


def test_blocks_style_on_a_bert_shaped_model_uses_no_split_modules():
    model = BertLike(n=3)
    assert find_blocks(model) == [f"bert.encoder.layer.{i}" for i in range(3)]
    s = generate_schedule(model, "blocks")
    assert s[0] == {"params": [r"bert\.pooler\..*", r"classifier\..*"]}
    assert s[1] == {"params": [r"bert\.encoder\.layer\.2\..*"]}
    assert s[4] == {"params": [r"bert\.embeddings\..*"]}
    resolved = resolve_schedule(s, [n for n, _ in model.named_parameters()])
    assert resolved.unscheduled == ()
    assert resolved.warnings == ()


def test_a_non_block_run_between_stacks_joins_the_block_below_it():
    model = nn.Module()
    model.enc = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    model.enc_norm = nn.LayerNorm(2)
    model.dec = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    model.out = nn.Linear(2, 2)
    s = generate_schedule(model, "blocks")
    assert s[0] == {"params": [r"out\..*"]}
    assert s[2] == {"params": [r"dec\.0\..*"]}
    assert s[3] == {"params": [r"enc_norm\..*", r"enc\.1\..*"]}
    assert len(s) == 5


def test_model_without_repeated_blocks_falls_back_to_top_level_children():
    model = nn.Module()
    model.backbone = nn.Linear(2, 3)
    model.neck = nn.Conv1d(3, 3, 1)
    model.head = nn.Linear(3, 1)
    assert generate_schedule(model, "blocks") == {
        0: {"params": [r"head\..*"]},
        1: {"params": [r"neck\..*"]},
        2: {"params": [r"backbone\..*"]},
    }


def test_pairs_style_is_reverse_registration_order_two_per_phase():
    model = Net(n_layers=1)
    names = [n for n, _ in model.named_parameters()]
    s = generate_schedule(model, style="pairs")
    assert s[0] == {"params": names[::-1][:2]}
    assert len(s) == (len(names) + 1) // 2
    assert resolve_schedule(s, names).unscheduled == ()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule style 'layers'"):
        generate_schedule(Net(), style="layers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no parameters"):
        generate_schedule(nn.ReLU())


# ---------------------------------------------------------------------------------------------- recipes

BODY = [rf"bert\.encoder\.layer\.{i}\..*" for i in (2, 1, 0)]
HEAD = [r"bert\.pooler\..*", r"classifier\..*"]
STEM = [r"bert\.embeddings\..*"]


def shape_of(phase: dict) -> dict:
    return phase["new_lr_scheduler"]["lr_scheduler_init"]["init_args"]


def test_lpft_trains_the_head_first_then_everything_else_at_lr():
    s = generate_schedule(BertLike(n=3), "lpft", lr=1e-4)
    assert s == {0: {"params": HEAD}, 1: {"params": BODY + STEM, "lr": 1e-4}}


def test_discriminative_lrs_fall_by_lr_decay_per_block_from_the_top_down():
    s = generate_schedule(BertLike(n=3), "discriminative", lr=1e-4, lr_decay=0.5)
    assert [s[k]["params"] for k in range(5)] == [HEAD, BODY[:1], BODY[1:2], BODY[2:], STEM]
    assert [s[k].get("lr") for k in range(5)] == [None, 1e-4, 5e-5, 2.5e-5, 1.25e-5]


def test_discriminative_default_lr_decay_is_the_recipe_default():
    from phasetune.core.recipes import DEFAULT_LR_DECAY

    s = generate_schedule(BertLike(n=3), "discriminative", lr=1e-4)
    assert s[2]["lr"] == lr_approx(1e-4 * DEFAULT_LR_DECAY)  # numerical: lr arithmetic in float64 (lr_approx)


def test_discriminative_with_two_blocks_per_phase_and_the_stem_left_frozen():
    s = generate_schedule(BertLike(n=3), "discriminative", lr=1e-4, lr_decay=0.5, blocks_per_phase=2,
                          include_stem=False)
    assert s == {0: {"params": HEAD}, 1: {"params": BODY[:2], "lr": 1e-4}, 2: {"params": BODY[2:], "lr": 2.5e-5}}


def test_blocks_recipe_options_give_every_phase_the_same_lr():
    s = generate_schedule(BertLike(n=3), "blocks", lr=3e-5)
    assert {s[k]["lr"] for k in range(1, 5)} == {3e-5}
    assert "lr" not in s[0]


def test_phase_steps_give_each_later_phase_its_own_warmup_then_decay_and_epoch_ends():
    s = generate_schedule(BertLike(n=3), "lpft", lr=1e-4, phase_steps=[10, 30], warmup_fraction=0.1, steps_per_epoch=5)
    assert "new_lr_scheduler" not in s[0]  # phase 0's shape comes from configure_optimizers
    assert s[1]["new_lr_scheduler"] == {
        "lr_scheduler_init": {"class_path": "phasetune.lr_shapes.WarmupLinearDecay",
                              "init_args": {"total_steps": 30, "warmup_steps": 3}},
        "pl_lrs_cfg": {"interval": "step"},
    }
    assert [s[0]["max_transition_epoch"], s[1]["max_transition_epoch"]] == [2, 8]


def test_one_phase_steps_value_applies_to_every_phase():
    s = generate_schedule(BertLike(n=3), "discriminative", lr=1e-4, phase_steps=4)
    assert [shape_of(s[k])["total_steps"] for k in range(1, 5)] == [4, 4, 4, 4]


@pytest.mark.parametrize("style", ["lpft", "discriminative", "blocks"])
def test_recipes_resolve_and_dump_as_an_ordinary_schedule_file(style, tmp_path):
    model = BertLike(n=3)
    names = [n for n, _ in model.named_parameters()]
    raw = generate_schedule(model, style, lr=1e-4, phase_steps=2, steps_per_epoch=1)
    resolved = resolve_schedule(raw, names, epoch_transitions_only=True)
    assert resolved.unscheduled == ()
    path = resolved.dump(tmp_path / "s.yaml", resolved=False)
    text = path.read_text()
    assert "phasetune.lr_shapes.WarmupLinearDecay" in text and "lr: 0.0001" in text
    assert resolve_schedule(path, names, epoch_transitions_only=True).to_dict() == resolved.to_dict()


def test_recipe_option_problems_are_collected_and_named():
    with pytest.raises(ValueError) as e:
        generate_schedule(BertLike(n=3), "discriminative", lr=-1, lr_decay=2.0, warmup_fraction=1.0, speed=3)
    text = str(e.value)
    for part in ("unknown option 'speed'", "lr must be a positive number", "lr_decay must be a number in (0, 1]",
                 "warmup_fraction must be a number in [0, 1)"):
        assert part in text
    with pytest.raises(ValueError, match="lr_decay applies to the 'discriminative' recipe only"):
        generate_schedule(BertLike(n=3), "lpft", lr_decay=0.5)
    with pytest.raises(ValueError, match="a list of 2 of them"):
        generate_schedule(BertLike(n=3), "lpft", phase_steps=[1, 2, 3])
    with pytest.raises(ValueError, match="not a whole number of epochs of 4 steps"):
        generate_schedule(BertLike(n=3), "lpft", phase_steps=[2, 6], steps_per_epoch=4)
    with pytest.raises(ValueError, match="the 'pairs' style takes no recipe options"):
        generate_schedule(BertLike(n=3), "pairs", lr=1e-4)


def test_a_stem_listed_in_no_split_modules_is_still_the_stem():
    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(10, 4)

    model = BertLike(n=3)
    model.bert.embeddings = Embeddings()
    model._no_split_modules = ["Layer", "Embeddings"]  # as Hugging Face's BERT lists BertEmbeddings
    s = generate_schedule(model, "lpft", include_stem=False)
    assert s == {0: {"params": HEAD}, 1: {"params": BODY}}


def test_the_default_style_is_lpft():
    assert generate_schedule(BertLike(n=3)) == generate_schedule(BertLike(n=3), "lpft")


def test_phase_steps_without_steps_per_epoch_write_cumulative_max_transition_steps():
    s = generate_schedule(BertLike(n=3), "lpft", lr=1e-4, phase_steps=[10, 30])
    assert [s[0]["max_transition_step"], s[1]["max_transition_step"]] == [10, 40]
    assert "max_transition_epoch" not in s[0] and shape_of(s[1])["total_steps"] == 30


@pytest.mark.parametrize("style, head_fraction, expected", [
    ("lpft", None, [30, 90]),                    # lpft's default: a quarter for the head
    ("lpft", 0.5, [60, 60]),
    ("discriminative", None, [24, 24, 24, 24, 24]),  # the others: an equal share
    ("blocks", 0.5, [60, 15, 15, 15, 15]),
])
def test_a_step_budget_is_split_across_the_phases(style, head_fraction, expected):
    options = {"total_steps": 120} | ({} if head_fraction is None else {"head_fraction": head_fraction})
    s = generate_schedule(BertLike(n=3), style, lr=1e-4, **options)
    assert [s[k]["max_transition_step"] for k in range(len(s))] == list(itertools.accumulate(expected))
    assert [shape_of(s[k])["total_steps"] for k in range(1, len(s))] == expected[1:]
    names = [n for n, _ in BertLike(n=3).named_parameters()]
    assert resolve_schedule(s, names, epoch_transitions_only=True).phases[-1].max_transition_step == 120


def test_step_budget_problems_name_the_option():
    with pytest.raises(ValueError, match="either phase_steps"):
        generate_schedule(BertLike(n=3), "lpft", total_steps=10, phase_steps=5)
    with pytest.raises(ValueError, match=r"total_steps must be an integer >= the number of phases \(5\)"):
        generate_schedule(BertLike(n=3), "discriminative", total_steps=4)
    with pytest.raises(ValueError, match=r"head_fraction must be a number in \(0, 1\)"):
        generate_schedule(BertLike(n=3), "lpft", total_steps=10, head_fraction=1.5)


def test_lpft_ft_head_lr_restarts_the_head_at_the_body_lr_in_the_final_phase():
    import torch

    from phasetune import ScheduledFinetuning
    from phasetune.core.recipes import phase_lr_shape
    from phasetune.lr_shapes import WarmupLinearDecay

    s = generate_schedule(BertLike(n=3), "lpft", lr=2e-4, total_steps=8, head_fraction=0.25, ft_head_lr=2e-4,
                          head_groups=2, steps_per_epoch=1, warmup_fraction=0.0)
    assert s[1]["new_lr_scheduler"]["init_pg_lrs"] == [2e-4, 2e-4]  # a plain schedule entry, one per group
    assert "new_lr_scheduler" not in s[0]
    # run it: after the transition every group (head included) follows phase 1's shape from 2e-4
    model = BertLike(n=3)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=1e-3)
    ft = ScheduledFinetuning(s, model, opt, WarmupLinearDecay(opt, **phase_lr_shape(2, 0.0)),
                             epoch_transitions_only=True, restore_best=False)
    lrs = []
    for step in range(8):
        sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
        ft.optimizer.step()
        ft.optimizer.zero_grad()
        ft.lr_scheduler.step()
        ft.step(step)
        lrs.append([g["lr"] for g in ft.optimizer.param_groups])
    # numerical, the lrs below: float64 arithmetic against decimal literals (lr_approx)
    assert len(lrs[0]) == 2 and lrs[0][0] == lr_approx(5e-4)  # phase 0: the head at the optimizer's 1e-3
    assert len(lrs[2]) == 4  # phase 1 added the body's two groups
    assert lrs[2] == lr_approx([2e-4 * 5 / 6] * 4)  # one step into phase 1's 6-step decay, head included
    assert lrs[-1] == lr_approx([0.0] * 4)


def test_ft_head_lr_problems_name_the_option():
    with pytest.raises(ValueError, match="ft_head_lr needs phase_steps or total_steps"):
        generate_schedule(BertLike(n=3), "lpft", ft_head_lr=1e-4)
    with pytest.raises(ValueError, match="ft_head_lr applies to the 'lpft' recipe only"):
        generate_schedule(BertLike(n=3), "discriminative", ft_head_lr=1e-4, total_steps=20)
    with pytest.raises(ValueError) as e:
        generate_schedule(BertLike(n=3), "lpft", ft_head_lr=-1.0, head_groups=0, total_steps=20)
    assert "ft_head_lr must be a positive number" in str(e.value) and "head_groups must be an integer >= 1" in str(e.value)
