"""Injecting LoRA before sharding: requires_grad kept, adapters frozen, renames recorded, on a plain module, Hugging
Face models built from a config (no download) and a PeftModel the user built; the target problems and the
"did you mean ...base_layer.weight?" check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phasetune.core.generate import block_units
from phasetune.lora import (
    LoraSpec,
    adapter_targets,
    inject_lora,
    pre_injection_name_problems,
    progressive_lora,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # peft -> transformers
              pytest.mark.usefixtures("one_process")]  # tiny models: one thread


class Plain(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 6, dtype=dtype), nn.ReLU(), nn.Linear(6, 6, dtype=dtype))
        self.norm = nn.LayerNorm(6, dtype=dtype)
        self.head = nn.Linear(6, 2, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.enc(x)))


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config).eval()


def thaw_only(model: nn.Module, names: set[str]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def test_peft_alone_refreezes_a_thawed_head():
    """The trap inject_lora guards against (peft 0.21: the first injection freezes every other parameter)."""
    model = Plain()
    thaw_only(model, {"head.weight"})
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["enc.0"]), model)
    assert not model.head.weight.requires_grad


def test_injection_keeps_every_existing_parameters_requires_grad():
    model = Plain()
    thaw_only(model, {"head.weight", "enc.0.weight", "norm.bias"})
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    record = inject_lora(model, LoraSpec(r=2), ["enc.0", "enc.2"])
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {record.renames.get(n, n): g for n, g in before.items()} == {n: g for n, g in after.items() if "lora_" not in n}
    assert record.restored == ("enc.0.base_layer.weight", "norm.bias", "head.weight")


def test_new_adapters_are_frozen_until_their_phase():
    model = Plain()
    record = inject_lora(model, LoraSpec(r=2), ["enc.0"])
    assert record.adapters == {"enc.0": ("enc.0.lora_A.default.weight", "enc.0.lora_B.default.weight")}
    params = dict(model.named_parameters())
    assert not any(params[n].requires_grad for n in record.adapters["enc.0"])


def test_the_record_maps_each_renamed_weight_to_its_base_layer_name():
    record = inject_lora(Plain(), LoraSpec(r=2), ["enc.2"])
    assert record.renames == {"enc.2.weight": "enc.2.base_layer.weight", "enc.2.bias": "enc.2.base_layer.bias"}
    assert record.modules == ("enc.2",)
    assert type(record).from_state(record.to_state()) == record


@pytest.mark.parametrize(("adapter_dtype", "expected"), [("float32", torch.float32), ("base", torch.bfloat16)])
def test_adapter_dtype_on_a_bf16_model(adapter_dtype, expected):
    model = Plain(torch.bfloat16)
    inject_lora(model, LoraSpec(r=2, adapter_dtype=adapter_dtype), ["enc.0"])
    assert model.enc[0].lora_A["default"].weight.dtype == expected
    assert model.enc[0].lora_B["default"].weight.dtype == expected
    assert model.enc[0].base_layer.weight.dtype == torch.bfloat16


def test_a_generator_draws_the_same_adapters_whatever_the_global_seed():
    a, b = Plain(), Plain()
    torch.manual_seed(1)
    inject_lora(a, LoraSpec(r=2), ["enc.0", "enc.2"], generator=torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    inject_lora(b, LoraSpec(r=2), ["enc.0", "enc.2"], generator=torch.Generator().manual_seed(5))
    for m in ("enc.0", "enc.2"):
        la, lb = a.get_submodule(m), b.get_submodule(m)
        assert torch.equal(la.lora_A["default"].weight, lb.lora_A["default"].weight)  # exact: same draws
        assert not la.lora_B["default"].weight.any()


def test_bert_by_target_modules_keeps_its_outputs():
    model = tiny_bert()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    spec = LoraSpec(r=4, target_modules=(r".*\.(query|value)",))
    modules, problems = adapter_targets(model, spec, {0: ["classifier\\..*"]})
    assert problems == []
    assert modules == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    inject_lora(model, spec, modules)
    assert "bert.encoder.layer.1.attention.self.value.base_layer.weight" in dict(model.named_parameters())
    assert torch.equal(model(input_ids=ids).logits, before)  # exact: B = 0 adds exactly zero


def test_llama_by_the_phases_of_a_recipe():
    model = tiny_llama()
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    units, has_stem = block_units(model)
    raw = progressive_lora(units, has_stem=has_stem, r=2, leaf="q_proj|v_proj")
    phases = {k: v["params"] for k, v in raw.items() if k != "peft"}
    modules, problems = adapter_targets(model, LoraSpec(r=2), phases)
    assert problems == []
    assert modules == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    inject_lora(model, LoraSpec(r=2), modules)
    assert torch.equal(model(input_ids=ids).logits, before)  # exact: B = 0 adds exactly zero


def test_a_peft_model_gets_nothing_new_for_the_adapters_it_has():
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    phases = {0: [r"base_model\.model\.bert\.encoder\.layer\.1\..*\.lora_[AB]\..*"]}
    assert adapter_targets(model, None, phases) == ([], [])


def test_a_peft_model_gets_the_adapters_a_phase_asks_for_through_its_inner_model():
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"]))
    query_b = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    with torch.no_grad():
        query_b.fill_(0.5)
    phases = {0: [r".*\.query\.lora_[AB]\..*"], 1: [r".*layer\.0\..*\.value\.lora_[AB]\..*"]}
    spec = LoraSpec(r=2)
    modules, problems = adapter_targets(model, spec, phases)
    assert problems == []
    assert modules == ["base_model.model.bert.encoder.layer.0.attention.self.value"]
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    record = inject_lora(model, spec, modules)
    assert torch.equal(model(input_ids=ids).logits, before)  # exact: the new adapter's B = 0 adds exactly zero
    with torch.no_grad():
        model.get_submodule(modules[0]).lora_B["default"].weight.fill_(0.5)
    assert not torch.equal(model(input_ids=ids).logits, before)  # and it is active in the PeftModel's forward
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.value"
    assert record.renames == {f"{prefix}.weight": f"{prefix}.base_layer.weight",
                              f"{prefix}.bias": f"{prefix}.base_layer.bias"}
    assert bool((query_b == 0.5).all())  # the adapter the user built is untouched
    assert model.base_model.model.peft_config is model.peft_config  # and so are its configs
    assert model.peft_config["default"].target_modules == {"query"}
    assert query_b.requires_grad  # and still trains, as get_peft_model left it


def test_target_problems_name_the_key_and_the_fix():
    model = tiny_bert()
    spec = LoraSpec(target_modules=("query", r"bert\.encoder\.layer\.0\.attention"))
    _, problems = adapter_targets(model, spec, {0: [r".*\.lora_A\.task\..*"]})
    assert problems[0] == ("peft section, key 'target_modules': 'query' matches no module name as a whole; did you "
                           r"mean '.*\.query' (2 modules, e.g. 'bert.encoder.layer.0.attention.self.query')?")
    assert "matches 'bert.encoder.layer.0.attention' (BertAttention), none of them an nn.Linear" in problems[1]
    assert problems[2].startswith(r"phase 0, key 'params': '.*\.lora_A\.task\..*' names LoRA parameters but matches "
                                  "no adapter of an nn.Linear module (it names adapter 'task'; the schedule's adapter "
                                  "is 'default')")
    assert len(problems) == 3


def test_naming_adapters_the_model_lacks_without_a_peft_section_is_a_problem():
    modules, problems = adapter_targets(Plain(), None, {1: [r"enc\.0\.lora_[AB]\..*"]})
    assert modules == []
    assert problems == ["phase 1 names LoRA adapters of 'enc.0', which have no adapter 'default'; add a peft section "
                        "(peft: {method: lora, r: 8, alpha: 16}) so phasetune injects them, or name only the "
                        "adapters the model has"]


def test_a_peft_section_that_targets_nothing_is_a_problem():
    _, problems = adapter_targets(Plain(), LoraSpec(), {0: ["head\\..*"]})
    assert problems[0].startswith("peft section: no module gets an adapter")


def test_a_name_from_before_injection_gets_did_you_mean():
    record = inject_lora(tiny_bert(), LoraSpec(r=2), ["bert.encoder.layer.0.attention.self.query"])
    name = "bert.encoder.layer.0.attention.self.query.weight"
    problems = pre_injection_name_problems(
        {1: [name, r"bert\.encoder\.layer\.0\..*"], 2: [r".*\.(query|key)\.weight"]}, record.renames)
    assert problems == [
        f"phase 1, key 'params': '{name}' is the name from before LoRA injection; did you mean "
        "'bert.encoder.layer.0.attention.self.query.base_layer.weight'?",
        r"phase 2, key 'params': '.*\.(query|key)\.weight' matched 'bert.encoder.layer.0.attention.self.query.weight' "
        "before LoRA injection, but not the new name 'bert.encoder.layer.0.attention.self.query.base_layer.weight'; "
        r"did you mean '.*\.(query|key)\.(?:base_layer\.)?weight'?",
    ]
