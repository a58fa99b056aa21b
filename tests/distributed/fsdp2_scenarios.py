"""2-process ModelParallelStrategy (FSDP2) scenarios, run by tests/test_fsdp2.py under torchrun: one launch.

Each scenario is one fit; every rank writes what it saw to rank<N>.json and the tests compare.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from fsdp2_models import ACT_CKPT_DEFAULTS, ACT_CKPT_PLAN, PLAN, SCHEDULE, LMModule, Probe, full_digest
from fts_reference.scenarios import scenario, thawed_per_epoch
from launch import write_report
from phasetune import (
    ConfigurationError,
    FinetuningScheduler,
    FTSCheckpoint,
    FTSEarlyStopping,
    export_full_model,
)

warnings.simplefilter("ignore")
torch.set_num_threads(1)
OUT = Path(sys.argv[1])
CLIP = 0.1  # small enough that every step clips: a wrong (per-rank) norm would change the result


def trainer(name: str, callbacks: list, max_epochs: int = 6, clip: float | None = CLIP, max_steps: int = -1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=max_epochs, max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, default_root_dir=str(OUT / name),
        gradient_clip_val=clip, use_distributed_sampler=False,  # LMModule splits its data without shuffling
    )


def fit(name: str, module_cls: type = LMModule, plan: Any = PLAN, defaults: Any = None, ckpt: Any = None,
        max_epochs: int = 6, save: bool = False, digest_every_epoch: bool = False) -> tuple[dict, Any, Any]:
    pl.seed_everything(3)
    module = module_cls()
    cfg = {"fsdp_plan": plan} | ({"fsdp_default_kwargs": defaults} if defaults else {})
    fts = FinetuningScheduler(ft_schedule=SCHEDULE, epoch_transitions_only=True, strategy_adapter_cfg=cfg)
    probe = Probe(fts, digest_every_epoch)
    callbacks = [fts, probe]
    if save:
        callbacks.append(FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(OUT / name), filename="{epoch}"))
    # runs shorter than the schedule stop by steps (4 per epoch: 64 samples, 2 ranks, batch 8): max_epochs alone
    # would be raised to the schedule's last max_transition_epoch, as in FTS
    t = trainer(name, callbacks, max_epochs, max_steps=4 * max_epochs if max_epochs < 6 else -1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module, ckpt_path=ckpt)
    report = {
        "epochs": probe.epochs,
        "ends": probe.ends,
        "start": probe.start,
        "final": full_digest(module),
        "phases": [[r.start_epoch, r.end_epoch, r.restored_best] for r in fts.history],
        "warnings": [str(w.message) for w in caught],
        "group_notes": fts.adapter.group_notes,
        "plan": {"sharded": fts.adapter.plan_report.sharded, "root": fts.adapter.plan_report.root},
        "patches_left": [k for k in ("load_checkpoint", "optimizer_state", "save_checkpoint") if k in vars(t.strategy)]
        + [k for k in ("clip_grad_by_norm",) if k in vars(t.precision_plugin)],
    }
    return report, t, module


def fit_error(name: str, module_cls: type = LMModule, plan: Any = PLAN) -> str:
    try:
        fit(name, module_cls, plan=plan, max_epochs=1)
    except ConfigurationError as e:
        return str(e)
    return "no error"


class MixedMeshes(LMModule):
    """configure_model shards the final norm and block 3 on the 2-D (HSDP) mesh; the plan shards the rest on 1-D."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.model.layers[3], mesh=self.device_mesh)
        fully_shard(self.model.norm, mesh=self.device_mesh)


class MixedDtypes(LMModule):
    def configure_model(self) -> None:
        self.model.layers[2].lin.to(torch.float64)


def module_facts(module: pl.LightningModule) -> dict[str, Any]:
    from torch.distributed._composable.contract import _get_registry
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    facts = {}
    for name in ("model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3", "model.norm", "model.head"):
        m = module.get_submodule(name)
        group = m._get_fsdp_state()._fsdp_param_group  # torch internals: what fully_shard was given
        facts[name] = {
            "wrapped": isinstance(m, CheckpointWrapper),
            "composable_ckpt": "checkpoint" in (_get_registry(m) or {}),
            "offload": type(group.offload_policy).__name__,
            "reshard_after_forward": group.post_forward_mesh_info is not None,
        }
    return facts


report: dict[str, Any] = {}
main, t, module = fit("main", save=True, digest_every_epoch=True)
report["main"] = main
export_full_model(t, OUT / "export")
rank = t.global_rank

report["resumed"], _, _ = fit("resumed", ckpt=OUT / "main" / "epoch=2.ckpt")

report["act_ckpt"], _, module = fit("act_ckpt", plan=ACT_CKPT_PLAN, defaults=ACT_CKPT_DEFAULTS, max_epochs=3)
report["act_ckpt"]["modules"] = module_facts(module)
report["act_ckpt"]["hooks_left"] = sorted(k for k in vars(module) if k == "configure_model")

report["mixed"], _, _ = fit("mixed", MixedMeshes, max_epochs=3)

# bf16 mixed precision: phase 1's blocks are frozen at the first forward (torch 2.13 fixes each unit's gradient
# dtypes then) and thawed at epoch 2, where the adapter's after_thaw refreshes them (refresh_unit_dtypes)
try:
    report["bf16"], _, _ = fit("bf16", defaults={"mp_policy": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}},
                               max_epochs=3, digest_every_epoch=True)
except RuntimeError as e:  # what torch raises without the refresh: the test shows it
    report["bf16"] = {"error": str(e)}

report["errors"] = {
    "no_match": fit_error("no_match", plan={"model.layer.0": {}, r"model\.layers\.\d+": {}}),
    "container": fit_error("container", plan={"model.layers": {}}),
    "bad_kwargs": fit_error("bad_kwargs", plan={"model.head": {"reshard_after_fwd": True, "act_ckpt": "always"}}),
    "outer_first": fit_error("outer_first", plan={"model": {}, "model.head": {}}),
    "dtype": fit_error("dtype", MixedDtypes),
}


class HFModule(pl.LightningModule):
    """A tiny BERT classifier built from a config (no download): implicit schedule, then save_pretrained export."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100, max_position_embeddings=32, num_labels=2)
        self.model = BertForSequenceClassification(cfg)

    def step(self, batch: Any) -> torch.Tensor:
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.step(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.step(batch), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    def _loader(self) -> Any:
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randint(0, 100, (16, 12), generator=g), torch.randint(0, 2, (16,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4)

    def train_dataloader(self) -> Any:
        return self._loader()

    def val_dataloader(self) -> Any:
        return self._loader()


pl.seed_everything(5)
hf = HFModule()
fts = FinetuningScheduler(strategy_adapter_cfg={"fsdp_plan": {r"model\.bert\.encoder\.layer\.\d+": {}}})
t = trainer("hf", [fts], max_epochs=1, clip=None)
t.fit(hf)
report["hf"] = {
    "phases": len(fts.schedule),
    "phase0": list(fts.schedule[0].params),
    "last_phase": list(fts.schedule[len(fts.schedule) - 1].params),
    "sharded": fts.adapter.plan_report.sharded,
    "weights": {k: v for k, v in full_digest(hf.model).items() if k.startswith(("classifier", "bert.encoder.layer.1.output"))},
}
export_full_model(t, OUT / "hf_export", submodule=hf.model)

# FTS's reference scenarios (tests/fts_reference), each Linear its own FSDP2 unit: the thawed set of every epoch
report["fts_thawed"] = {
    name: thawed_per_epoch(
        scenario(name), FinetuningScheduler, FTSEarlyStopping, FTSCheckpoint, OUT / f"fts_{name}", shardable=True,
        scheduler_kwargs={"strategy_adapter_cfg": {"fsdp_plan": {r"layers\.\d": {}}}},
        devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    )
    for name in ("es_restore_best", "epoch_only_123")
}

write_report(str(OUT), rank, report)
torch.distributed.destroy_process_group()
