"""The example of docs/peft.md runs as written and prints what the page says."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.mark.numerical
def test_the_peft_page_example_runs_and_prints_what_the_page_shows(run_doc_example, one_process):
    printed = run_doc_example("peft.md", "test_lora_docs.py")
    assert printed[0] == "6 adapters, the first on bert.encoder.layer.0.attention.self.query"
    assert printed[1].endswith("did you mean 'bert.encoder.layer.1.attention.self.key.base_layer.weight'?")
    moved = float(re.fullmatch(r"the merge moved the outputs by (\S+)", printed[2]).group(1))
    assert moved <= 1e-6  # numerical: one matmul reassociation in fp32, outputs below 1
    assert printed[3] == "20 tensors train in phase 1, adapters among them: False"
