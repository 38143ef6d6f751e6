"""The paper's three claims in its words, and the word for each verdict a claim can get.

One place for both: the findings stage (study/findings/claims.py) judges the claims and writes the report, and the
dashboard shows the stored verdicts under the same titles; the dashboard imports no `study` (docs/ARCHITECTURE.md,
layers), so the words live in the core package both import.
"""

from __future__ import annotations

# claim (the statistic of its `claims`, `claim_rules` and `sensitivity` rows) -> the paper's words
CLAIM_STATEMENTS = {
    "claim1": "Merging up to three adapters works (with a data-free method)",
    # claim 1 judged again on the best method that also needs each task's training images (RegMean): a reader must
    # see which verdict needs which
    "claim1_data_aware": "Merging up to three adapters works (with a data-aware method)",
    "claim2": "Adapters trained on dissimilar data merge better",
    "claim3": "Merges sometimes beat head finetuning",
}

# A `claims` row's value: 1 supported, 0 inconclusive, -1 contradicted, 2 untestable (the study is too small for
# its rule to find an effect of the size it names: claim 2's power; NULL: the data to judge it is missing).
SUPPORTED, INCONCLUSIVE, CONTRADICTED, UNTESTABLE = 1, 0, -1, 2
VERDICT_WORDS = {
    SUPPORTED: "supported",
    INCONCLUSIVE: "inconclusive",
    CONTRADICTED: "contradicted",
    UNTESTABLE: "untestable at this size",
}
