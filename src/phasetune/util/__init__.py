"""Small utilities every layer may use: rank and collectives without a process group (:mod:`.dist`),
YAML and atomic file writes (:mod:`.files`), text for people (:mod:`.text`). No phasetune imports."""
