"""The torch-only schedule logic: schedules and their validation, class specs, implicit schedule generation
and its recipes, the phase engine, optimizer parameter groups, phase-end decisions and thawing. Imports
nothing above :mod:`phasetune.util`, :mod:`phasetune.errors` and :mod:`phasetune.lr_shapes`."""
