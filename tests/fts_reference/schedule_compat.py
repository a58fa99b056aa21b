"""Do schedule files written for FTS resolve the same under phasetune?

Resolves each schedule in ``schedules/`` twice against a model built from a ``transformers`` config class with
random weights (no download; small widths, the real depth and parameter names), wrapped as ``model`` the way
FTS's examples wrap it in a LightningModule:

- with FTS 2.14.1's rule, restated here: an entry that is a parameter name is taken as is, otherwise it is a regex
  matched with ``re.match`` (anchored at the start only, so a prefix matches); an entry matching nothing is an
  error; phases must be disjoint;
- with :func:`phasetune.core.schedule.resolve_schedule` (whole-name match).

and prints, per schedule, whether both accept it and train the same parameters in every phase, else what differs
and phasetune's exact error or notes. phasetune keeps its promise for a schedule when both train the same
parameters, or when it refuses an entry FTS would read as a prefix with a problem naming the form that gives FTS's
set (an entry whose whole-name and prefix matches differ; see ``phasetune.core.schedule_validation``). Run from the
repository root with the project's environment (exit status 1 when a schedule breaks the promise)::

    .venv/bin/python -m tests.fts_reference.schedule_compat
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

SCHEDULES = Path(__file__).resolve().parent / "schedules"
# schedule file -> the model it was written for
TARGETS = {
    "fts_RteBoolqModule_ft_schedule_deberta_base.yaml": "deberta-v3",
    "fts_RteBoolqModule_ft_schedule_deberta_base_fsdp.yaml": "deberta-v3",
    "fts_explicit_reinit_lr.yaml": "deberta-v3",
    "fts_explicit_reinit_optim_lr.yaml": "deberta-v3",
    "fts_generated_albert.yaml": "albert",
    "albert_prefix_style.yaml": "albert",
    "albert_alternation.yaml": "albert",
}


def model_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """Parameter names (prefixed ``model.``) and shapes of a randomly initialised sequence classifier."""
    import transformers as tf

    if kind == "deberta-v3":  # the structure of microsoft/deberta-v3-base's config, narrow
        config = tf.DebertaV2Config(
            vocab_size=128, hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64,
            relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
            pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False, type_vocab_size=0,
        )
        model = tf.DebertaV2ForSequenceClassification(config)
    elif kind == "albert":  # albert-base-v2's structure (one shared layer group), narrow
        config = tf.AlbertConfig(vocab_size=128, embedding_size=16, hidden_size=32, num_attention_heads=2,
                                 intermediate_size=64)
        model = tf.AlbertForSequenceClassification(config)
    else:
        raise KeyError(kind)
    return {f"model.{n}": tuple(p.shape) for n, p in model.named_parameters()}


def fts_resolve(raw: Mapping[Any, Any], names: Sequence[str]) -> tuple[dict[int, list[str]], list[str]]:
    """Resolve ``raw`` with FTS's rule (exact name, else ``re.match``); returns (phase -> names, errors)."""
    phases: dict[int, list[str]] = {}
    errors: list[str] = []
    for key, body in raw.items():
        hits: list[str] = []
        for entry in body.get("params", []):
            if entry in names:
                hits.append(entry)
                continue
            pattern = re.compile(entry)
            found = [n for n in names if pattern.match(n)]
            if not found:
                errors.append(f"phase {key}: {entry!r} matched no parameter")
            hits.extend(found)
        phases[int(key)] = hits
    seen: dict[str, int] = {}
    for depth, hits in phases.items():
        for n in hits:
            if n in seen and seen[n] != depth:
                errors.append(f"phases {seen[n]} and {depth} both hold {n} (FTS: 'Phases are not disjoint')")
            seen.setdefault(n, depth)
    return phases, errors


def check(path: Path, kind: str) -> list[str]:
    """Report lines for one schedule file."""
    from phasetune.core.schedule import resolve_schedule
    from phasetune.errors import ScheduleError

    shapes = model_shapes(kind)
    names = list(shapes)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    fts_phases, fts_errors = fts_resolve(raw, names)
    lines = [f"{path.name} (model {kind}, {len(names)} parameter tensors, {len(raw)} phases)"]
    fts_count = len({n for hits in fts_phases.values() for n in hits})
    lines.append(f"  FTS rule: {'refused: ' + '; '.join(fts_errors) if fts_errors else f'accepted, {fts_count} tensors scheduled'}")
    try:
        schedule = resolve_schedule(path, shapes)
    except ScheduleError as e:
        lines.append("  phasetune: refused:")
        lines.extend(f"    {line}" for line in str(e).splitlines())
        if not fts_errors and all("as a prefix, as finetuning-scheduler reads it" in p for p in e.problems):
            lines.append("  => refused, naming the form that gives FTS's set")
        return lines
    lines.append(f"  phasetune: accepted, {len(schedule.scheduled_params)} tensors scheduled, "
                 f"{len(schedule.unscheduled)} unscheduled")
    lines.extend(f"    note: {w}" for w in schedule.warnings)
    same = True
    for phase in schedule:
        ours, theirs = set(phase.params), set(fts_phases.get(phase.index, []))
        if ours != theirs:
            same = False
            lines.append(f"    phase {phase.index} differs: only phasetune {sorted(ours - theirs)}; "
                         f"only FTS {sorted(theirs - ours)}")
    if same and not fts_errors:
        lines.append("  => same parameters in every phase")
    return lines


def main() -> int:
    ok = True
    for name, kind in TARGETS.items():
        lines = check(SCHEDULES / name, kind)
        ok &= any(line.startswith("  => ") for line in lines)
        print("\n".join(lines), end="\n\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
