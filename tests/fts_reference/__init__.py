"""Reference trajectories recorded from finetuning-scheduler (FTS) 2.14.1, and the tools to compare against them.

``scenarios.py`` defines the runs (plain torch + Lightning), ``record.py`` records them under FTS in a scratch
environment, ``compare.py`` runs them under phasetune and diffs the two. FTS is never imported by the test suite.
"""
