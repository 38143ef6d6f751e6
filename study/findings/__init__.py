"""The paper's three claims, measured from the stored merges (study v2): the `findings` rows and the report.

Every figure is one `findings` row (value, 95 % CI, n = the number of resampling units, and a note naming the
unit, or NULL with the reason when the data cannot support it); `reports/findings.md` is rendered from the
`findings` view alone: no number in it is typed by hand. The statistics themselves live in study/statistics.py,
the task similarity the pair analysis reads in study/similarity.py (its own stage). One module per concept:

- `exclusion`: which tasks are left out, by rule (`ExclusionRules`: at the ceiling or measured on too few images);
  their rows are left out of every figure and claim, and pairs containing them out of the pair analysis.
- `inputs`: what the findings are computed from (`StudyInputs`), merges prepared once (McNemar per row).
- `figures`: per (method, k): the method chosen per k on validation (never test), each cell's figures with CIs
  that bootstrap merged groups, and the data-aware methods against the best data-free one.
- `pairs`: claim 2's evidence, pair merges against task similarity (task bootstrap, exact permutation tests).
- `claims`: each claim one `Claim`: statement, rule in words, and the code that judges it.
- `analysis`: the whole analysis in named steps, and every verdict recomputed leaving each task out.
- `report`: the Markdown report and where it is written (`report_path`).
- `stage`: the findings stage run_all runs (`FindingsStage`).
"""
