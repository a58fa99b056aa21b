"""Implicit schedule generation."""

from __future__ import annotations

import pytest
from torch import nn

from helpers import Net
from phasetune import generate_schedule, resolve_schedule
from phasetune.generate import find_blocks


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
    s = generate_schedule(Net(n_layers=4))
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
    s = generate_schedule(model)
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
    s = generate_schedule(model)
    assert s[0] == {"params": [r"out\..*"]}
    assert s[2] == {"params": [r"dec\.0\..*"]}
    assert s[3] == {"params": [r"enc_norm\..*", r"enc\.1\..*"]}
    assert len(s) == 5


def test_model_without_repeated_blocks_falls_back_to_top_level_children():
    model = nn.Module()
    model.backbone = nn.Linear(2, 3)
    model.neck = nn.Conv1d(3, 3, 1)
    model.head = nn.Linear(3, 1)
    assert generate_schedule(model) == {
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
