"""2-process DDP (gloo) with the prefix cache, run by tests/test_prefix_cache.py under torchrun.

The same 3 epochs of DDP training over a DistributedSampler that reshuffles every epoch, once without and
once with the cache: each rank reports its parameters, how many samples it cached after epoch 1 and at the
end, how many batches came from the cache, and whether spill files were left behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from launch import digest, write_report
from phasetune.features.prefix_cache.cache import IndexedDataset, PrefixCache

torch.set_num_threads(1)
OUT = Path(sys.argv[1])


def model() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    net[0].requires_grad_(False)
    net[2].requires_grad_(False)
    return net


def run(cached: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g)
    ds = IndexedDataset(TensorDataset(x, (x[:, 0] > 0).long()))
    sampler = DistributedSampler(ds, shuffle=True, seed=5)
    loader = DataLoader(ds, batch_size=5, sampler=sampler)
    net = model()
    ddp = DistributedDataParallel(net)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    cache = PrefixCache(net, "2", spill_dir=OUT / "spill", limit_bytes=0, chunk_bytes=512).activate() if cached else None
    report: dict = {}
    for epoch in range(3):
        sampler.set_epoch(epoch)
        net.train()
        if cache is None:
            net[:3].eval()  # the reference: the prefix in eval mode, no cache
        for batch in loader:
            (inputs, y), _ = batch
            if cache is not None:
                cache.next_batch(batch)
            loss = nn.functional.cross_entropy(ddp(inputs), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if cache is not None and epoch == 0:
            report["entries_after_epoch_1"] = cache.memory()["entries"]
    if cache is not None:
        report.update(entries=cache.memory()["entries"], served=cache.batches_served)
        dirs = {f.parent for f in cache.spill_files()}
        cache.close()
        report.update(spill_dirs=len(dirs), spill_dirs_left=sum(d.exists() for d in dirs))
    report["params"] = digest(net)
    return report


dist.init_process_group("gloo")
try:
    plain, cached = run(False), run(True)
    result = {"params_plain": plain.pop("params"), "params_cached": cached.pop("params"), **cached}
    write_report(str(OUT), dist.get_rank(), result)
finally:
    dist.destroy_process_group()
