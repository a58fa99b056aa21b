"""LoRA, merged at a phase transition, then full fine-tuning of the top block: all-MiniLM-L6-v2 on Rotten Tomatoes.

Run it from the repository root (a few minutes on 2 CPU cores; the demo's model and data, no download)::

    HF_HUB_OFFLINE=1 python -m examples.peft.train                        # the whole run, a checkpoint per epoch
    HF_HUB_OFFLINE=1 python -m examples.peft.train --stop_after_epoch 1   # "interrupted" right after the merge
    HF_HUB_OFFLINE=1 python -m examples.peft.train --resume               # continues from the last checkpoint

The schedule is an ordinary YAML file (``examples/peft/schedule.yaml``, the ``lora_then_full`` recipe): phase 0
trains the classifier, the pooler and LoRA adapters (rank 8) on every layer's query and value projections; at step
64 phasetune folds every adapter into its base weight (``merge_lora: true``), takes the adapters out of the
optimizer and thaws layer 5's own weights for 32 more steps. ``phasetune.ScheduledFinetuning`` injects the
adapters (the schedule's ``peft`` section) into the model it is given, before reading its parameters.

Each epoch (a pass over ``--train_size`` snippets) ends with a checkpoint: the model's state dict (merged weights
and zeroed ``B`` included), the optimizer, the lr scheduler and phasetune's state (phase, merge record, random
state, the loader's generator). ``--resume`` builds everything afresh, loads phasetune's state first (it replays
the merge's bookkeeping: the adapters frozen and out of the optimizer, without touching a weight), then the
weights, optimizer and lr scheduler, and continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import torch
import yaml

from examples.rotten_tomatoes.data import load_snippets, model_dir, pad_batch, stratified_split
from phasetune import ScheduledFinetuning
from phasetune.lr_shapes import WarmupLinearDecay

HERE = Path(__file__).resolve().parent


def loaders(tokenizer, train_size: int, eval_size: int, batch_size: int) -> tuple[torch.utils.data.DataLoader, ...]:
    """The demo's split (seed 42, 48 tokens); the first ``train_size`` training and ``eval_size`` validation snippets."""
    texts, labels = load_snippets()
    split = stratified_split(labels, 500, 1000, seed=42)
    ids = tokenizer(texts, truncation=True, max_length=48)["input_ids"]
    collate = functools.partial(pad_batch, pad_id=tokenizer.pad_token_id or 0)
    train = [(ids[i], labels[i]) for i in split.train[:train_size]]
    val = [(ids[i], labels[i]) for i in split.val[:eval_size]]
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                        generator=torch.Generator().manual_seed(0)),
            torch.utils.data.DataLoader(val, batch_size=64, collate_fn=collate))


def evaluate(model: torch.nn.Module, val: torch.utils.data.DataLoader) -> tuple[float, float]:
    """Validation loss and accuracy."""
    model.eval()
    loss = correct = n = 0.0
    with torch.no_grad():
        for batch in val:
            out = model(**batch)
            loss += float(out.loss) * len(batch["labels"])
            correct += float((out.logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
    model.train()
    return loss / n, correct / n


def main(argv: list[str] | None = None) -> list[str]:
    """Train (or continue) the run; returns the lines it printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default=str(HERE / "schedule.yaml"), help="the schedule file")
    parser.add_argument("--output_dir", default="peft_output", help="a checkpoint per epoch: epoch_<k>.pt")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output_dir")
    parser.add_argument("--stop_after_epoch", type=int, default=None, help="stop after this epoch's checkpoint")
    parser.add_argument("--train_size", type=int, default=512, help="training snippets (an epoch is a pass over them)")
    parser.add_argument("--eval_size", type=int, default=500, help="validation snippets evaluated after each epoch")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="phase 0's lr (the head and the adapters)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()  # "the classifier's weights are new" is expected
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    train, val = loaders(tokenizer, args.train_size, args.eval_size, args.batch_size)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2)
    model.train()
    phases = yaml.safe_load(Path(args.schedule).read_text())
    last_step = max(body["max_transition_step"] for k, body in phases.items() if k != "peft")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # over every parameter: phasetune fits it to phase 0
    scheduler = WarmupLinearDecay(optimizer, total_steps=phases[0]["max_transition_step"], warmup_steps=2)
    ft = ScheduledFinetuning(args.schedule, model, optimizer, scheduler, epoch_transitions_only=True,
                             restore_best=False, train_loader=train)  # the adapters are injected here
    out, printed, epoch, step = Path(args.output_dir), [], 0, 0

    def say(line: str) -> None:
        printed.append(line)
        print(line, flush=True)

    saved = sorted(out.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if args.resume and saved:
        state = torch.load(saved[-1], weights_only=True)
        ft.load_state_dict(state["phasetune"])  # first: the saved phase's groups, the merge record
        model.load_state_dict(state["model"])
        ft.optimizer.load_state_dict(state["optimizer"])
        ft.lr_scheduler.load_state_dict(state["lr_scheduler"])
        epoch, step = state["epoch"] + 1, state["step"]
        say(f"resumed from {saved[-1].name}: phase {ft.depth}, step {step}")
    while step < last_step:
        for batch in train:
            loss = model(**batch).loss
            loss.backward()
            ft.optimizer.step()
            ft.lr_scheduler.step()
            ft.optimizer.zero_grad(set_to_none=True)
            step += 1
            if ft.step_end() is not None:  # the transition into phase 1: merged, then layer 5 thawed
                trained = [n for n, p in model.named_parameters() if p.requires_grad]
                say(f"step {step}: phase {ft.depth}, {len(trained)} tensors train, LoRA adapters among them: "
                    f"{any('.lora_' in n for n in trained)}")
            if step == last_step:
                break
        val_loss, val_acc = evaluate(model, val)
        say(f"epoch {epoch}: phase {ft.depth}, step {step}, val_loss {val_loss:.4f}, val_acc {val_acc:.3f}")
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": ft.optimizer.state_dict(), "phasetune": ft.state_dict(),
                    "lr_scheduler": ft.lr_scheduler.state_dict(), "epoch": epoch, "step": step}, out / f"epoch_{epoch}.pt")
        if epoch == args.stop_after_epoch:
            say(f"stopped after epoch {epoch}; continue with --resume")
            return printed
        epoch += 1
    ft.close()
    for merge in ft.run.state_dict()["lora"]:  # the merge record phasetune keeps in its checkpoint state
        say(f"merged at the start of phase {merge['phase']}: adapter {merge['adapter']!r} of {len(merge['modules'])} modules")
    return printed


if __name__ == "__main__":
    main()
