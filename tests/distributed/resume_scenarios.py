"""2-process resume scenarios (run under torchrun, gloo, CPU), one launch per mode.

``resume_scenarios.py OUT lightning ONE_CKPT`` (tests/test_exact_resume_sharded.py): exact resume under Lightning's DDP,
FSDPStrategy (FSDP1) and ModelParallelStrategy (FSDP2, sharded and full checkpoints). Every fit trains a 3-phase
schedule with restore-best on, a shuffling distributed sampler, a Dropout layer and data that draws from Python's
``random`` (gauss cache) and NumPy in ``__getitem__``. Each strategy runs once uninterrupted with a ``DataLoader``
(Lightning adds its DistributedSampler), saving a checkpoint after every epoch, and resumes from several of them;
DDP, FSDP1 and sharded FSDP2 also run once with torchdata's ``StatefulDataLoader`` over its
``StatefulDistributedSampler``, saving a checkpoint every 3 optimizer steps, and resume from two in the middle of
an epoch. DDP also resumes mid-epoch with a ``StatefulDataLoader`` over the DistributedSampler Lightning adds, and
FSDP2 continues from ONE_CKPT, a ModelParallel checkpoint saved by one process. Every rank reports the final
parameters it holds.

``resume_scenarios.py OUT topology ONE_CKPT`` (tests/test_topology.py): the plain strategy saves a checkpoint
on 2 ranks, and loads ONE_CKPT (saved by 1 process): refused without ``resume_rng="reseed"``, re-seeded with it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launch import write_report

# phase 0 ends after epoch 1, phase 1 after epoch 3; scripted val_loss makes restore-best roll both back
SCHEDULE = {
    0: {"params": ["model.head.*"], "max_transition_epoch": 2},
    1: {"params": [r"model\.layers\.[23]\..*"], "lr": 0.05, "max_transition_epoch": 4},
    2: {"params": [r"model\.layers\.[01]\..*", "model.embed.*"], "lr": 0.02, "max_transition_epoch": 5},
}
LOSSES = [1.0, 1.1, 0.9, 0.95, 0.8]
EPOCHS = 5
# resume points (epoch checkpoints): inside phase 0, the last epoch of phase 0 (the resumed run transitions
# first thing), the first epoch after that transition, the last epoch of phase 1 (the next transition follows)
RESUME_AT = (0, 1, 2, 3)
# mid-epoch points (step checkpoints; 4 optimizer steps an epoch): step 6 is after 2 batches of epoch 1 (the last
# of phase 0), step 9 after the first batch of epoch 2 (phase 1's first optimizer step, right after a transition
# whose restore-best rolled the model back)
EVERY_N_STEPS = 3
MID_EPOCH_AT = (6, 9)


def lightning_fit() -> Callable[..., dict[str, Any]]:
    """The fit these scenarios run (Lightning imported here: the topology mode does without it).

    ``fit(kind, root, name, ckpt=None, devices=2, resume_rng="exact", stateful=False, step_checkpoints=False,
    stateful_sampler=False)`` trains under ``kind`` (``ddp``, ``fsdp1``, ``fsdp2``: sharded checkpoints,
    ``fsdp2_full``: full ones) in ``root/name`` and returns what rank 0 saw. ``stateful`` trains from a
    ``StatefulDataLoader``; ``step_checkpoints`` adds a ``ModelCheckpoint`` every ``EVERY_N_STEPS`` optimizer steps
    (``step=<n>.ckpt``); ``stateful_sampler`` gives that loader torchdata's ``StatefulDistributedSampler`` (the
    same order as Lightning's DistributedSampler: same seed) instead of letting Lightning add its own.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    from fsdp_cpu import CPUFSDPStrategy
    from helpers import Block, DropoutToyModule, NoisyData
    from phasetune import FinetuningScheduler, FTSCheckpoint
    from phasetune.sharding import full_state_dict

    class RandomModule(DropoutToyModule):
        """DropoutToyModule (batch 8 a rank) through the loader class asked for; over torchdata's stateful sampler
        if asked, else Lightning's DistributedSampler."""

        def __init__(self, loader: type[DataLoader] = DataLoader, stateful_sampler: bool = False) -> None:
            super().__init__(val_losses=LOSSES, batch_size=8)
            self.loader = loader
            self.stateful_sampler = stateful_sampler

        def train_dataloader(self) -> DataLoader:
            data = NoisyData()
            if self.stateful_sampler:  # seed: what Lightning gives its DistributedSampler (PL_GLOBAL_SEED)
                sampler = StatefulDistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.global_rank,
                                                     shuffle=True, seed=7)
                return self.loader(data, batch_size=self.batch_size, sampler=sampler)
            return self.loader(data, batch_size=self.batch_size, shuffle=True)  # Lightning's DistributedSampler

    def strategy(kind: str, devices: int) -> Any:
        if kind == "ddp":
            return "ddp"
        if kind == "fsdp1":
            return CPUFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True)
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                     save_distributed_checkpoint=kind == "fsdp2")

    def adapter_cfg(kind: str) -> dict[str, Any]:
        if kind == "ddp":
            return {}
        if kind == "fsdp1":
            return {"awp_overrides": ["model.head"]}
        return {"fsdp_plan": {r"model\.layers\.\d+": {}, "model.head": {}}}

    def fit(kind: str, root: Path, name: str, ckpt: Path | None = None, devices: int = 2,
            resume_rng: str = "exact", stateful: bool = False, step_checkpoints: bool = False,
            stateful_sampler: bool = False) -> dict[str, Any]:
        pl.seed_everything(7)
        module = RandomModule(StatefulDataLoader if stateful else DataLoader, stateful_sampler)
        fts = FinetuningScheduler(ft_schedule=SCHEDULE, epoch_transitions_only=True, resume_rng=resume_rng,
                                  strategy_adapter_cfg=adapter_cfg(kind))
        ck = FTSCheckpoint(monitor="val_loss", save_top_k=-1, dirpath=str(root / name), filename="{epoch}")
        losses: dict[int, float] = {}

        class Losses(pl.Callback):  # every step's loss: the batches and dropout masks, also of a rolled-back epoch
            def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, *args: Any) -> None:
                losses[trainer.global_step] = float(outputs["loss"])

        callbacks: list[Any] = [fts, ck, Losses()]
        if step_checkpoints:
            callbacks.append(ModelCheckpoint(every_n_train_steps=EVERY_N_STEPS, save_top_k=-1, dirpath=str(root / name),
                                             filename="{step}"))
        t = pl.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy(kind, devices), max_epochs=EPOCHS, callbacks=callbacks,
            logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            deterministic=True, default_root_dir=str(root / name), use_distributed_sampler=not stateful_sampler,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.fit(module, ckpt_path=ckpt)
        # a collective: every rank calls it and reports what it got, full tensors (DDP, FSDP2's DTensors) or, under
        # FSDP1 (flat parameters, no DTensors), that rank's shard of each: the tests compare every rank's report
        full = full_state_dict(t.lightning_module, rank0_only=False)
        return {
            "phases": [[r.start_epoch, r.end_epoch, r.restored_best] for r in fts.history],
            "warnings": [str(w.message) for w in caught
                         if any(s in str(w.message) for s in ("snapshot", "random", "StatefulDataLoader"))],
            "final": {n: v.double().flatten().tolist() for n, v in full.items()},
            "losses": losses,
            "patches_left": [k for k in ("load_checkpoint", "save_checkpoint", "process_dataloader")
                             if k in vars(t.strategy)],
            "hidden_files": sorted(p.name for p in (root / name).iterdir() if p.name.startswith(".")),
        }

    return fit


def lightning_scenarios(out: Path, one_device_ckpt: Path) -> dict[str, Any]:
    import phasetune.features.random_state
    from phasetune.lightning.sharded import read_callback_state

    fit = lightning_fit()
    report: dict[str, Any] = {}
    # DDP and FSDP1 with a full checkpoint file, FSDP2 with a sharded (DCP) checkpoint directory and with a full file
    for kind, resume_at, mid_epoch_at in (("ddp", (1, 2), MID_EPOCH_AT), ("fsdp1", RESUME_AT, MID_EPOCH_AT),
                                          ("fsdp2", RESUME_AT, MID_EPOCH_AT), ("fsdp2_full", (1, 2), ())):
        report[kind] = {"reference": fit(kind, out, f"{kind}_ref")}
        for epoch in resume_at:
            report[kind][f"epoch={epoch}"] = fit(kind, out, f"{kind}_from{epoch}", out / f"{kind}_ref" / f"epoch={epoch}.ckpt")
        if mid_epoch_at:
            # a StatefulDataLoader over torchdata's StatefulDistributedSampler: a run of its own (the loader draws
            # from torch's generator where a DataLoader does not), its step checkpoints resumed mid-epoch
            ref = out / f"{kind}_sds_ref"
            report[kind]["sds_reference"] = fit(kind, out, ref.name, stateful=True, step_checkpoints=True,
                                                stateful_sampler=True)
        for step in mid_epoch_at:
            report[kind][f"sds_step={step}"] = fit(kind, out, f"{kind}_sds_from_step{step}", ref / f"step={step}.ckpt",
                                                   stateful=True, stateful_sampler=True)
        if kind != "fsdp2":  # a single file: are Adam's two moments of each parameter saved apart?
            state = torch.load(out / f"{kind}_ref" / "epoch=2.ckpt", weights_only=False)["optimizer_states"][0]["state"]
            report[kind]["moments_apart"] = all(s["exp_avg"].data_ptr() != s["exp_avg_sq"].data_ptr() for s in state.values())
        saved = read_callback_state(out / f"{kind}_ref" / "epoch=2.ckpt", "FinetuningScheduler")
        report[kind]["saved_rng"] = {"world_size": saved["rng"]["world_size"], "ranks": sorted(saved["rng"]["states"]),
                                     "generators": sorted(saved["rng"]["states"][1])}
    # a StatefulDataLoader over the DistributedSampler Lightning adds: Lightning 2.6 re-creates the iterator of a
    # run resumed mid-epoch before it gives the sampler the epoch (phasetune gives it first), and torchdata skips
    # the consumed samples of the sampler's order as it is then
    ref = out / "ddp_stateful_ref"
    report["ddp"]["stateful_reference"] = fit("ddp", out, ref.name, stateful=True, step_checkpoints=True)
    report["ddp"]["step=6"] = fit("ddp", out, "ddp_from_step6", ref / "step=6.ckpt", stateful=True)
    # its epoch-end checkpoint: the sampler torchdata gives the loader keeps a generator, advanced every epoch
    report["ddp"]["stateful_epoch=2"] = fit("ddp", out, "ddp_stateful_from2", ref / "epoch=2.ckpt", stateful=True)
    # 1 -> 2: a ModelParallel checkpoint saved by one process goes on here, re-seeded (DCP reshards the state)
    report["fsdp2"]["from_one_device"] = fit("fsdp2", out, "fsdp2_from_one", one_device_ckpt, resume_rng="reseed")
    # the control: a resume that leaves the generators where the new process has them
    restore = phasetune.features.random_state.restore_checkpoint_state
    phasetune.features.random_state.restore_checkpoint_state = lambda *a, **k: None
    try:
        report["fsdp2"]["without_random_state"] = fit("fsdp2", out, "fsdp2_norng", out / "fsdp2_ref" / "epoch=2.ckpt")
    finally:
        phasetune.features.random_state.restore_checkpoint_state = restore
    return report


def topology_scenarios(out: Path, one_ckpt: Path) -> dict[str, Any]:
    from plain_strategy_runs import build, refusal, state_report, train_into_phase_1, train_steps

    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("phasetune").addHandler(handler)
    report: dict[str, Any] = {}
    strategy, model, ft = build()
    train_into_phase_1(strategy, model, ft)
    strategy.save_ckpt(model, out / "ckpt", "phase1", finetuning=ft)
    report["saved"] = state_report(model, ft)
    _, model, ft = build()
    report["refused"] = refusal(strategy, model, ft, one_ckpt)
    _, model, ft = build(resume_rng="reseed")
    strategy.load_ckpt(model, one_ckpt, finetuning=ft)
    report["from_one"] = state_report(model, ft)
    report["from_one_warnings"] = "\n".join(said)
    report["draws"] = torch.rand(3).tolist()
    train_steps(strategy, model, ft)
    report["from_one_trained"] = True
    _, model, ft = build(resume_rng="reseed")
    strategy.load_ckpt(model, one_ckpt, finetuning=ft)
    report["draws_again"] = torch.rand(3).tolist()
    return report


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    OUT = Path(sys.argv[1])
    run = lightning_scenarios if sys.argv[2] == "lightning" else topology_scenarios
    result = run(OUT, Path(sys.argv[3]))
    write_report(str(OUT), torch.distributed.get_rank(), result)
    torch.distributed.destroy_process_group()
