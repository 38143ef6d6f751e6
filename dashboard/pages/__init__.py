"""The dashboard's pages: one module per page (dashboard/pages/<slug>.py, each with `page(db, filters)`),
listed once in `PAGES`, which the sidebar, the URL (`?page=<slug>`) and the render measurements read.

Adding a page: write dashboard/pages/<slug>.py with `page(db, filters)` (read through `queries`, compute
through `analysis`, draw through `charts` and `common`) and add its line to `PAGES` below; the
dashboard's tests read this list (docs/ARCHITECTURE.md, "A dashboard page", says every step).
"""

from dashboard.pages import dissimilarity, merge_count, merges_vs_heads, methods, overview, performance, plan, runs

# slug (the URL's ?page=) -> (sidebar title, the function that draws the page), in sidebar order
PAGES = {
    "overview": ("Overview", overview.page),
    "merge_count": ("Merge count", merge_count.page),
    "dissimilarity": ("Dissimilarity", dissimilarity.page),
    "merges_vs_heads": ("Merges vs head finetuning", merges_vs_heads.page),
    "methods": ("Methods", methods.page),
    "plan": ("Merge plan", plan.page),
    "runs": ("Runs", runs.page),
    "performance": ("Performance", performance.page),
}
