"""2-process FSDP2 (gloo) LoRA scenarios, one launch, run by tests/test_lora_fsdp2.py.

``merge``: a 3-layer model with LoRA on every layer (out dims 5, 1 and 4 over 2 ranks: uneven rows, an empty
shard, and one ``B`` sharded on dim 1 so that layer takes the gather-``B`` path) is merged with a restart under
fully_shard and compared with the same merge on one process. Then: the merge record check (a collective read
of ``B``), injecting after sharding, and a bf16 model whose fp32 adapters share a unit with trained base
weights (phasetune's check against FSDP2's own failure).

The ranks build their LoRA layers with :class:`LoraLinear`, peft's layer as phasetune reads it, so that they
need not import peft (about 8 s of CPU each here); tests/test_lora_fsdp2.py checks it against peft's own
layer (same names, same values, same outputs). No Lightning is imported here.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from phasetune.lora.layers import draw_lora_A

MODULES = ["l1", "l2", "l3"]


class LoraLinear(nn.Module):
    """peft's LoRA ``Linear`` as phasetune reads it: ``base_layer``, ``lora_A``/``lora_B`` by adapter name,
    ``scaling``, and its forward ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dtype: torch.dtype, adapter: str = "default") -> None:
        super().__init__()
        self.base_layer = base
        self.lora_dropout = nn.ModuleDict({adapter: nn.Identity()})
        self.lora_A = nn.ModuleDict({adapter: nn.Linear(base.in_features, r, bias=False, dtype=dtype)})
        self.lora_B = nn.ModuleDict({adapter: nn.Linear(r, base.out_features, bias=False, dtype=dtype)})
        self.scaling = {adapter: alpha / r}
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        result = self.base_layer(x)
        x = x.to(self.lora_A[a].weight.dtype)
        return (result + self.lora_B[a](self.lora_A[a](self.lora_dropout[a](x))) * self.scaling[a]).to(result.dtype)


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.l1 = nn.Linear(7, 5, dtype=dtype)
        self.l2 = nn.Linear(5, 1, dtype=dtype)
        self.l3 = nn.Linear(1, 4, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def add_lora(net: nn.Module, modules: list[str], r: int, alpha: float, generator: torch.Generator,
             dtype: torch.dtype = torch.float32) -> None:
    """What ``inject_lora(net, LoraSpec(r, alpha), modules, generator=generator)`` does, with :class:`LoraLinear`."""
    for name in modules:
        layer = LoraLinear(getattr(net, name), r, alpha, dtype)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(draw_lora_A(layer.lora_A["default"].weight.shape, generator))
            layer.lora_B["default"].weight.zero_()
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
            p.requires_grad_(False)  # frozen until their phase; the base weight keeps its flag
        setattr(net, name, layer)


def lora_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same model with trained-looking adapters on every rank (B random, so the merge changes W)."""
    torch.manual_seed(0)
    net = Net(dtype)
    add_lora(net, MODULES, 4, 8.0, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in MODULES:
            b = net.get_submodule(m).lora_B["default"].weight
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return net


def full_params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in net.named_parameters()}


def merge_scenario() -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from phasetune.lora import MergeRecord, check_merge_record, merge_lora
    from phasetune.lora.merge import _same_rows

    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(3))
    single = lora_net()
    merge_lora(single, MODULES, reinit=torch.Generator().manual_seed(4))
    expected, expected_out = full_params(single), single(x).detach()

    net = lora_net()
    b3 = net.l3.lora_B["default"].weight
    fully_shard(net.l1)
    fully_shard(net.l2)
    fully_shard(net, shard_placement_fn=lambda p: Shard(1) if p is b3 else None)
    layers = {m: net.get_submodule(m) for m in MODULES}
    paths = {m: "rows" if _same_rows(la.base_layer.weight, la.lora_B["default"].weight) else "gather B"
             for m, la in layers.items()}
    local_rows = {m: la.base_layer.weight.to_local().shape[0] for m, la in layers.items()}
    result = merge_lora(net, MODULES, reinit=torch.Generator().manual_seed(4))
    got = full_params(net)
    return {
        "paths": paths,
        "local_rows": local_rows,
        "max_weight_diff": max(float((got[n] - expected[n]).abs().max()) for n in got if ".lora_A." not in n),
        "fresh_A_equal": all(torch.equal(got[n], expected[n]) for n in got if ".lora_A." in n),
        "B_zero": all(bool((got[n] == 0).all()) for n in got if ".lora_B." in n),
        "out_diff": float((net(x).detach() - expected_out).abs().max()),
        "frozen": list(result.frozen),
        # the record of a merge without restart, so that the check reads (a collective) every sharded B
        "record_problems": check_merge_record(net, MergeRecord.from_state(
            [{"phase": 1, "adapter": "default", "modules": MODULES}]), {1: MODULES}, phase=1),
    }


def after_sharding_scenario() -> str:
    from torch.distributed.fsdp import fully_shard

    from phasetune.errors import ConfigurationError
    from phasetune.lora import LoraSpec, inject_lora

    torch.manual_seed(0)
    net = Net()
    fully_shard(net.l1)
    fully_shard(net)
    try:
        inject_lora(net, LoraSpec(r=2), ["l1"])  # refused before peft is imported
    except ConfigurationError as e:
        return str(e)
    return "no error"


def mixed_dtype_scenario() -> dict:
    """bf16 base weights, fp32 adapters, all in the root unit; phase 1 thaws the base weight of l1."""
    from torch.distributed.fsdp import fully_shard

    from phasetune.lora import fsdp2_units, trainable_by_phase, unit_dtype_problems

    torch.manual_seed(0)
    net = Net(torch.bfloat16)
    add_lora(net, ["l1"], 2, 2.0, torch.Generator().manual_seed(1), dtype=torch.float32)
    phases = [["l1.lora_A.default.weight", "l1.lora_B.default.weight"], ["l1.base_layer.weight"]]
    fully_shard(net)
    problems = unit_dtype_problems(net, fsdp2_units(net), trainable_by_phase(phases))
    for n, p in net.named_parameters():
        p.requires_grad_(n in phases[0] or n in phases[1])
    try:
        net(torch.randn(2, 7, dtype=torch.bfloat16))
        fsdp_error = "no error"
    except AssertionError as e:
        fsdp_error = str(e)
    return {"problems": problems, "fsdp_error": fsdp_error}


def main() -> None:
    from launch import write_report

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    report = {"merge": merge_scenario(), "after_sharding": after_sharding_scenario(),
              "mixed_dtype": mixed_dtype_scenario()}
    write_report(sys.argv[1], dist.get_rank(), report)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
