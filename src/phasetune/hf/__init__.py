"""The Hugging Face ``transformers.Trainer`` face of phasetune (the only package that imports transformers).

Run a schedule under the Trainer with a :class:`PhasetuneTrainerCallback` in the ``callbacks`` of a
:class:`PhasetuneTrainer` (or of your own Trainer class with :class:`PhasetuneTrainerMixin` first in its
bases)::

    ft = PhasetuneTrainerCallback("schedule.yaml", patience=2)
    trainer = PhasetuneTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[ft])
    trainer.train()                       # or train(resume_from_checkpoint=...) to continue in the saved phase
"""

from phasetune.hf.callback import STATE_FILE, PhasetuneTrainerCallback, read_state
from phasetune.hf.trainer import PhasetuneTrainer, PhasetuneTrainerMixin

__all__ = ["STATE_FILE", "PhasetuneTrainer", "PhasetuneTrainerCallback", "PhasetuneTrainerMixin", "read_state"]
