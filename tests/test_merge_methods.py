"""Merge methods: the math pinned on small hand-worked examples, plus the registry contract."""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import merging.methods
from merging.merged_model import RUNNERS, STATISTIC_SOURCES
from merging.methods import MERGE_METHODS, TASK_ARITHMETIC_GRID, MergeMethod, get_method, list_methods
from merging.methods._base import GRID_SIZE, KIND_PARTS, MethodKind, StartsFrom
from merging.methods._knots import knots_align
from merging.methods.iso_cts import subspace_sizes
from merging.methods.tsv_m import tsv_components
from mlvision.errors import MergeConfigError, UnknownNameError

# Parametrized over the registry itself, never a hand-copied list: a new method is tested as it is listed.
ALL = list_methods()
PER_LAYER = list_methods(kind="data_free")  # pure functions on ΔW (references merge whole adapters through peft)
REFERENCES = list_methods(kind="reference")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def low_rank(out_f: int, in_f: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / rank


def assert_close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


# ----------------------------------------------------------------------------- registry


def test_registry_holds_the_methods_and_the_peft_references():
    assert list(MERGE_METHODS) == ALL and ALL[-len(REFERENCES) :] == REFERENCES  # the references come last
    assert {"linear", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts"} <= set(PER_LAYER)
    assert ALL.index("iso_cts") == ALL.index("iso_c") + 1
    assert REFERENCES == ["peft_linear", "peft_cat", "peft_svd", "peft_ties"]


def where(name: str) -> str:
    """What a registry-wide test's failure says first: the method and the file that declares it."""
    for info in pkgutil.iter_modules(merging.methods.__path__):
        module = importlib.import_module(f"merging.methods.{info.name}")
        if any(m.name == name for m in [*getattr(module, "METHODS", []), getattr(module, "METHOD", None)] if m):
            return f"{name}: edit its record in merging/methods/{info.name}.py"
    raise AssertionError(f"{name} is declared in no module of merging/methods")


@pytest.mark.parametrize("name", PER_LAYER)
def test_every_method_is_documented_and_its_defaults_validate(name):
    m = get_method(name)
    assert m.name == name
    assert "arXiv" in m.paper and m.description, f"{where(name)}: its paper (with the arXiv id) and description"
    assert m.validate({}) == m.defaults
    module = __import__(m.fn.__module__, fromlist=["_"])
    if m.space == "core":  # a full-space method run in Core Space: that method's module documents it
        assert module.__name__ == "merging.methods.core_space" and name.endswith("_core")
        module = __import__(get_method(name.removesuffix("_core")).fn.__module__, fromlist=["_"])
        assert get_method(name.removesuffix("_core")).defaults == m.defaults
    else:
        assert module.__name__ == f"merging.methods.{name}", f"{name}: its module is merging/methods/{name}.py"
    assert "Hyperparameters" in module.__doc__, f"{where(name)}: its docstring lists its Hyperparameters"
    missing = [key for key in m.defaults if key not in module.__doc__]
    assert not missing, f"{where(name)}: its docstring explains no {missing}"


@pytest.mark.parametrize("name", REFERENCES)
def test_references_are_documented_and_refuse_per_layer_calls(name):
    m = get_method(name)
    assert m.kind == "reference" and m.fn is None and m.paper and m.description
    assert m.options["combination_type"] == name.removeprefix("peft_") and m.validate({}) == {}
    with pytest.raises(MergeConfigError, match="reference merge of whole adapters"):
        m([torch.ones(2, 2)])


@pytest.mark.parametrize("name", ALL)
def test_a_method_with_a_grid_names_its_own_hyperparameters(name):
    m = get_method(name)
    for k in (2, 6, 20):
        rule = m.selection_rule(k)
        assert isinstance(rule, list) and bool(rule) == m.tuned == bool(m.grid), where(name)
        for point in rule:
            assert set(point) == set(m.grid) <= set(m.defaults) and m.validate(point), where(name)


@pytest.mark.parametrize("name", ALL)
def test_what_a_method_needs_is_declared_and_has_a_runner(name):
    """Each kind is run by merged_model.RUNNERS; each statistic a method takes has a source; a starting point names
    a registered method's hyperparameter; a test-time method is rebuilt from one of its recorded outputs."""
    m = get_method(name)
    assert m.kind in RUNNERS, f"{m.kind}: add its runner to RUNNERS in merging/merged_model.py"
    for statistic in (*m.statistics, *m.optional_statistics):
        assert statistic in STATISTIC_SOURCES, (
            f"{name} takes {statistic!r}: add where it comes from to STATISTIC_SOURCES in merging/merged_model.py"
        )
    if m.starts_from is not None:
        assert m.starts_from.chosen in get_method(m.starts_from.method).defaults, where(name)
    if m.transductive:
        assert m.rebuilt_from in m.recorded_outputs or not m.servable, where(name)
    assert m.uses_data == bool(m.statistics or m.learn) and m.per_layer == (m.fn is not None)


def test_every_kind_has_a_runner_and_its_parts():
    assert set(RUNNERS) == set(MethodKind) == set(KIND_PARTS), (
        "every MethodKind has its parts in KIND_PARTS (merging/methods/_base.py) and its runner in RUNNERS "
        "(merging/merged_model.py)"
    )


def test_a_method_lacking_what_its_kind_needs_is_refused_at_declaration():
    """A second data-aware or test-time method cannot silently inherit another method's rules: what it needs is a
    field of its own record, and a record without it is refused when declared, naming the missing part."""
    fields = dict(paper="p", description="d", defaults={"init": 0.3}, ranges={"init": (0.0, 1.0, "[]")})

    def learn(folded, adapters, unlabeled, **hyperparams):
        raise AssertionError("not called")

    with pytest.raises(ValueError, match="test-time method is served only rebuilt.*`rebuilt_from`"):
        MergeMethod(name="test_time_x", fn=None, kind="test_time", learn=learn, **fields)
    with pytest.raises(ValueError, match="test_time_x: a test_time method needs `learn`"):
        MergeMethod(name="test_time_x", fn=None, kind="test_time", **fields)
    with pytest.raises(ValueError, match="rebuilt_from.*one of its recorded_outputs"):
        MergeMethod(
            name="test_time_x", fn=None, kind="test_time", learn=learn, rebuilt_from="weights", rebuild=learn, **fields
        )
    with pytest.raises(ValueError, match="data_aware_x: a data_aware method needs `statistics`"):
        MergeMethod(name="data_aware_x", fn=lambda deltas, init: deltas[0], kind="data_aware", **fields)
    with pytest.raises(ValueError, match="data_free_x: a data_free method has no `statistics`"):
        MergeMethod(name="data_free_x", fn=lambda deltas, init: deltas[0], statistics=("grams",), **fields)
    with pytest.raises(ValueError, match="kind must be one of"):
        MergeMethod(name="x", fn=lambda deltas, init: deltas[0], kind="data-aware", **fields)
    with pytest.raises(ValueError, match="starts_from sets 'scaling', which is not a hyperparameter"):
        MergeMethod(
            name="x", fn=None, kind="test_time", learn=learn, servable=False,
            starts_from=StartsFrom("task_arithmetic", "scaling", "scaling"), **fields,
        )  # fmt: skip
    # declared with what it needs, it is accepted, and says what it is
    declared = MergeMethod(
        name="test_time_x", fn=None, kind="test_time", learn=learn, recorded_outputs=("weights",),
        rebuilt_from="weights", rebuild=learn, **fields,
    )  # fmt: skip
    assert declared.kind is MethodKind.TEST_TIME and declared.transductive and declared.uses_data
    assert not declared.per_layer and declared.inputs({"init": 0.5, "weights": [1]}) == {"init": 0.5}


def test_list_methods_takes_a_kind_or_its_name():
    assert list_methods(kind="data_aware") == list_methods(kind=MethodKind.DATA_AWARE) == ["regmean"]
    assert get_method("regmean").kind == "data_aware" and str(get_method("regmean").kind) == "data_aware"


def test_the_dashboard_has_a_colour_for_every_method():
    """Colours follow the registry's order (dashboard/charts.py `method_colors`); a palette too short for the
    registry would give two methods one colour."""
    from dashboard.charts import METHOD_COLORS, METHOD_PALETTE, REFERENCE_GREYS

    references = list_methods(kind="reference")
    assert len(ALL) - len(references) <= len(METHOD_PALETTE), "add a colour to METHOD_PALETTE in dashboard/charts.py"
    assert len(references) <= len(REFERENCE_GREYS), "add a grey to REFERENCE_GREYS in dashboard/charts.py"
    assert list(METHOD_COLORS) == ALL


# Every module of the project (tests aside) asks a method's record what it needs, never its kind: kinds are told
# apart only in merging/methods/_base.py (`MethodKind`, `KIND_PARTS`) and merging/merged_model.RUNNERS.
ROOT = Path(__file__).resolve().parents[1]
DECLARED_NOT_COMPARED = sorted(
    path
    for folder in ("mlvision", "training", "merging", "benchmarks", "study", "dashboard", "demo", "scripts")
    for path in (ROOT / folder).rglob("*.py")
)
_KINDS = r"['\"](data_free|data_aware|test_time|reference)['\"]"
KIND_COMPARISON = re.compile(
    rf"\bkind\s*(==|!=)\s*({_KINDS}|MethodKind\.)|(?<!for )\bkind\s+(not\s+)?in\s*[(\[{{][^)\]}}]*{_KINDS}"
    r"|\bkind\s+is\s+(not\s+)?MethodKind"
)


def test_no_code_compares_method_kinds():
    """What a kind needs is a field of the method's record (`statistics`, `learn`, `starts_from`, `servable`, ...):
    a comparison such as `kind == "test_time"` elsewhere would give a second method of that kind the first one's
    rules. Only merging/methods/_base.py names kinds."""
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in DECLARED_NOT_COMPARED
        if path.name != "_base.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if KIND_COMPARISON.search(line)
    ]
    assert not found, "ask the method's record (MergeMethod fields, merging/methods/_base.py) instead: " + "; ".join(
        found
    )


@pytest.mark.parametrize("name", PER_LAYER)
def test_every_data_free_method_has_a_five_point_grid_starting_at_its_defaults(name):
    """The same validation budget for every method: 5 distinct points, the paper's default first, and at least three
    values of each hyperparameter (so a choice at the grid's edge shows: five values of one, or a star of two)."""
    m = get_method(name)
    points = m.selection_rule(2)
    grid_rule = (
        f"{where(name)}: its `grid` has {GRID_SIZE} distinct points (5 values of one hyperparameter, or a star of "
        "3 values of each of two: grid_design='star')"
    )
    assert m.tuned and len(points) == GRID_SIZE == 5, grid_rule
    assert len({tuple(sorted(p.items())) for p in points}) == 5, grid_rule  # distinct
    assert points[0] == {key: m.defaults[key] for key in m.grid}  # the default point, first (wins ties)
    assert all(len({p[key] for p in points}) >= 3 for key in m.grid), grid_rule
    assert m.default_source, (
        f"{where(name)}: give `default_source`, where its default (the grid's first point) comes from: the paper, its "
        "code, or why it was chosen"
    )
    doc = __import__(m.fn.__module__, fromlist=["_"]).__doc__.lower()
    assert "grid" in doc, f"{where(name)}: its docstring states its validation grid"
    assert all(m.validate(point) for point in points)
    for k in (3, 6, 20):  # a grid that falls with k keeps its five distinct points, each in range
        at_k = m.selection_rule(k)
        assert len({tuple(sorted(p.items())) for p in at_k}) == 5 and all(m.validate(p) for p in at_k), where(name)


@pytest.mark.parametrize("name", REFERENCES)
def test_references_are_untuned_with_one_setting(name):
    m = get_method(name)
    assert not m.tuned and m.selection_rule(2) == [] and m.grid_points(6) == [{}]


def test_a_grid_is_a_product_or_a_star_of_two_hyperparameters_with_the_default_first():
    """A product tries every combination (9 points for 3 x 3); a star (the study's two-hyperparameter methods) the
    default and each hyperparameter's other values with the other at its default (5 points)."""
    fields = dict(
        name="x", fn=lambda deltas, density, scaling: deltas[0], paper="p", description="d",
        defaults={"density": 0.2, "scaling": 1.0}, ranges={"density": (0, 1, "(]"), "scaling": (0, 4, "(]")},
        grid={"density": (0.1, 0.2, 0.5), "scaling": (0.7, 1.0, 1.3)},
    )  # fmt: skip
    product = MergeMethod(**fields).grid_points(2)
    assert product[0] == {"density": 0.2, "scaling": 1.0} and len(product) == 9
    assert {(p["density"], p["scaling"]) for p in product} == {(d, s) for d in (0.1, 0.2, 0.5) for s in (0.7, 1.0, 1.3)}
    assert MergeMethod(**fields, grid_design="star").grid_points(2) == [
        {"density": 0.2, "scaling": 1.0},
        {"density": 0.1, "scaling": 1.0},
        {"density": 0.5, "scaling": 1.0},
        {"density": 0.2, "scaling": 0.7},
        {"density": 0.2, "scaling": 1.3},
    ]
    with pytest.raises(ValueError, match="grid_design"):
        MergeMethod(**fields, grid_design="random")


def test_a_grid_that_falls_with_k_scales_every_points_scaling_by_two_over_k_to_the_power():
    """The grid's `scaling` values are a pair's; k tasks get each times (2/k)^p, three significant digits, the other
    hyperparameters as declared (issue 33: a fixed grid's choice sat at its top for pairs and its bottom at k = 6)."""
    fields = dict(
        name="x", fn=lambda deltas, density, scaling: deltas[0], paper="p", description="d",
        defaults={"density": 0.2, "scaling": 1.0}, ranges={"density": (0, 1, "(]"), "scaling": (0, 4, "(]")},
        grid={"density": (0.1, 0.2, 0.5), "scaling": (0.7, 1.0, 1.3)}, grid_design="star",
    )  # fmt: skip
    fixed, falling = MergeMethod(**fields), MergeMethod(**fields, scaling_falls_with_k=1.0)
    assert falling.grid_points(2) == fixed.grid_points(2) == fixed.grid_points(6)
    assert falling.grid_points(6) == [
        {"density": 0.2, "scaling": 0.333},
        {"density": 0.1, "scaling": 0.333},
        {"density": 0.5, "scaling": 0.333},
        {"density": 0.2, "scaling": 0.233},
        {"density": 0.2, "scaling": 0.433},
    ]
    half = MergeMethod(**fields, scaling_falls_with_k=0.5).grid_points(8)
    assert [p["scaling"] for p in half] == [0.5, 0.5, 0.5, 0.35, 0.65]
    with pytest.raises(ValueError, match="scaling_falls_with_k"):
        MergeMethod(**{**fields, "grid": {"density": (0.1, 0.2, 0.5)}}, scaling_falls_with_k=1.0)


def test_a_grid_without_its_default_or_out_of_range_is_refused_at_definition():
    fields = dict(name="x", fn=lambda deltas, scaling: deltas[0], paper="p", description="d")
    with pytest.raises(ValueError, match="contain its default"):
        MergeMethod(**fields, defaults={"scaling": 1.0}, ranges={"scaling": (0, 2, "(]")}, grid={"scaling": (0.5,)})
    with pytest.raises(ValueError, match="range"):
        MergeMethod(**fields, defaults={"scaling": 1.0}, ranges={"scaling": (0, 2, "(]")}, grid={"scaling": (1.0, 3)})
    with pytest.raises(ValueError, match="scaling_is_output_multiplier"):
        MergeMethod(**fields, defaults={}, ranges={}, scaling_is_output_multiplier=True)


MULTIPLIERS = [name for name in PER_LAYER if get_method(name).scaling_is_output_multiplier]


def test_the_study_methods_declare_the_scaling_shortcut():
    assert {"task_arithmetic", "ties", "dare_ties", "knots_ties", "tsv_m", "iso_c", "iso_cts"} <= set(MULTIPLIERS)


@pytest.mark.parametrize("name", MULTIPLIERS)
def test_scaling_declared_a_multiplier_is_one(name):
    """merge(scaling = s) == s · merge(scaling = 1) at every grid point (the sweep merges once and multiplies)."""
    m = get_method(name)
    xs = [low_rank(12, 10, 3, seed) for seed in range(3)]
    for point in [*m.grid_points(2), *m.grid_points(6)]:
        rest = {key: value for key, value in point.items() if key != "scaling"}
        unit = m(xs, **rest, scaling=1.0)
        assert unit.abs().max() > 0
        for scaling in {point["scaling"], 0.37}:
            assert_close(m(xs, **rest, scaling=scaling), scaling * unit, atol=1e-6)


def test_get_method_unknown_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        get_method("nope")
    msg = str(err.value)
    assert "nope" in msg and all(n in msg for n in ALL)


def test_task_arithmetic_grid_is_exported_falls_with_k_and_stays_in_range():
    m = get_method("task_arithmetic")
    assert m.grid["scaling"] == TASK_ARITHMETIC_GRID == (0.3, 0.5, 0.7, 1.0, 1.4)
    assert m.selection_rule(2) == [{"scaling": value} for value in (0.3, 0.5, 0.7, 1.0, 1.4)]  # the default first
    assert m.selection_rule(6) == [{"scaling": value} for value in (0.125, 0.208, 0.291, 0.415, 0.581)]  # × 3^-0.8
    assert get_method("knots_ta").selection_rule(6) == m.selection_rule(6)  # KnOTS-TA is task arithmetic aligned
    for k in (2, 3, 6, 20):
        for point in m.selection_rule(k):
            m.validate(point)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name, params, needle",
    [
        ("ties", {"densty": 0.3}, "densty"),
        ("linear", {"scalin": 1.0}, "scalin"),
        ("linear", {"scaling": 0}, "(0.0, 4.0]"),
        ("ties", {"density": 0}, "(0.0, 1.0]"),
        ("ties", {"density": 1.5}, "1.5"),
        ("magnitude_prune", {"density": -0.1}, "density"),
        ("dare_linear", {"drop_rate": 1.0}, "[0.0, 1.0)"),
        ("dare_ties", {"seed": 1.5}, "integer"),
        ("dare_ties", {"seed": -1}, "seed"),
        ("task_arithmetic", {"scaling": 2.5}, "(0.0, 2.0]"),
        ("task_arithmetic", {"scaling": float("nan")}, "nan"),
        ("iso_c", {"scaling": True}, "scaling"),
        ("tsv_m", {"scaling": "1"}, "scaling"),
    ],
)
def test_validate_rejects_bad_hyperparameters_naming_method_and_parameter(name, params, needle):
    with pytest.raises(MergeConfigError) as err:
        get_method(name).validate(params)
    msg = str(err.value)
    assert name in msg and needle in msg and list(params)[0] in msg


def test_validate_fills_defaults_and_keeps_given_values():
    ties = get_method("ties")
    assert ties.validate({"density": 0.5}) == {**ties.defaults, "density": 0.5} and ties.defaults["scaling"] == 1.0
    assert get_method("dare_ties").validate({"seed": 7})["seed"] == 7


def test_call_rejects_bad_deltas_naming_the_index():
    ties = get_method("ties")
    a = torch.zeros(2, 3)
    with pytest.raises(MergeConfigError, match=r"ties.*update 2 has shape \(3, 2\)"):
        ties([a, a, torch.zeros(3, 2)])
    with pytest.raises(MergeConfigError, match="at least one"):
        ties([])
    with pytest.raises(MergeConfigError, match=r"update 1 must be a 2-D"):
        ties([a, torch.zeros(2, 3, 1)])
    with pytest.raises(MergeConfigError, match=r"update 1 has dtype"):
        ties([a, a.double()])
    with pytest.raises(MergeConfigError, match="list"):
        ties(a)
    with pytest.raises(MergeConfigError, match="densty"):
        ties([a], densty=0.1)


# ----------------------------------------------------------------------------- TIES

# Three tasks, 2x3. Trim with density 0.5 keeps 3 of 6 entries per task:
#   T1 = [[ 4, -1,  2 ], [ 0.5,  3,  -6]]  |.| top3: 6, 4, 3     -> [[ 4, 0, 0], [ 0, 3, -6]]
#   T2 = [[-2,  5,  1 ], [ 1,  -0.5,  2]]  |.| top3: 5, 2, 2     -> [[-2, 5, 0], [ 0, 0,  2]]
#   T3 = [[ 1, -4, 0.5], [-3,   2,   -1]]  |.| top3: 4, 3, 2     -> [[ 0,-4, 0], [-3, 2,  0]]
# Column sums of the trimmed values: [[2, 1, 0], [-3, 5, -4]] -> elected signs [[+,+,?],[-,+,-]];
# (0,2) has no surviving value (T1's 2 was trimmed), so it stays 0 whatever the sign.
# Disjoint mean over the agreeing non-zero values:
#   (0,0): 4 (T2's -2 disagrees)      (0,1): 5 (T3's -4 disagrees)     (0,2): 0
#   (1,0): -3                         (1,1): (3 + 2)/2 = 2.5            (1,2): -6 (T2's 2 disagrees)
TIES_TASKS = [
    t([[4, -1, 2], [0.5, 3, -6]]),
    t([[-2, 5, 1], [1, -0.5, 2]]),
    t([[1, -4, 0.5], [-3, 2, -1]]),
]
TIES_EXPECTED = t([[4, 5, 0], [-3, 2.5, -6]])


def test_ties_trim_elect_disjoint_mean_by_hand():
    ties = get_method("ties")
    assert_close(ties(TIES_TASKS, density=0.5, scaling=1.0), TIES_EXPECTED)
    assert_close(ties(TIES_TASKS, density=0.5, scaling=0.5), TIES_EXPECTED * 0.5)


def test_ties_zero_sum_takes_the_layer_majority_sign():
    # density 1 (no trim). Entry (0,0): 1 + (-1) = 0 -> the sign of the whole layer's sum
    # (1 + 2 - 1 + 1 = 3 > 0) is used, so only +1 counts -> 1. Entry (0,1): mean(2, 1) = 1.5.
    out = get_method("ties")([t([[1, 2]]), t([[-1, 1]])], density=1.0)
    assert_close(out, t([[1, 1.5]]))


def test_ties_elects_the_sign_with_the_larger_mass_not_the_larger_count():
    # density 1: values 5, -1, -1 -> sum 3 > 0, so + is elected (two of three tasks are
    # negative) and the disjoint mean is 5.
    assert_close(get_method("ties")([t([[5.0]]), t([[-1.0]]), t([[-1.0]])], density=1.0), t([[5.0]]))


def test_magnitude_prune_by_hand():
    # Same trimmed tasks as the TIES example, then a plain mean over all 3 tasks:
    # sums [[2, 1, 0], [-3, 5, -4]] / 3.
    out = get_method("magnitude_prune")(TIES_TASKS, density=0.5, scaling=1.0)
    assert_close(out, t([[2 / 3, 1 / 3, 0], [-1, 5 / 3, -4 / 3]]))


# ----------------------------------------------------------------------------- DARE


def test_dare_with_drop_rate_zero_equals_the_plain_methods():
    xs = [low_rank(6, 5, 2, s) for s in range(3)]
    plain = {"drop_rate": 0.0, "seed": 3, "scaling": 1.0}
    assert torch.equal(get_method("dare_linear")(xs, **plain), get_method("linear")(xs))
    assert torch.equal(get_method("dare_ties")(xs, **plain), get_method("ties")(xs, density=1.0))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_per_seed_and_differs_across_seeds(name):
    xs = [low_rank(8, 6, 2, s) for s in range(3)]
    m = get_method(name)
    assert torch.equal(m(xs, seed=11), m(xs, seed=11))
    assert not torch.equal(m(xs, seed=11), m(xs, seed=12))


def test_dare_drops_and_rescales_survivors_exactly():
    # k = 1, p = 0.75: each entry is either dropped (0) or kept and multiplied by 1/(1-p) = 4.
    x = torch.arange(1, 401, dtype=torch.float32).reshape(20, 20)
    out = get_method("dare_linear")([x], drop_rate=0.75, seed=5, scaling=1.0)
    kept = out != 0
    assert torch.equal(out[kept], 4 * x[kept])
    assert abs(kept.float().mean().item() - 0.25) < 0.08  # 400 Bernoulli(0.25): sd 0.022


def test_dare_preserves_the_expected_update():
    # E[DARE(x)] = x. Per entry the mean of N=2000 seeds has sd = sqrt(Σ_i x_i² · p/(1-p)) / k / √N
    # <= sqrt(2 · 1 · 1) / 2 / 44.7 ≈ 0.016 for |x| <= 1, p = 0.5, k = 2; tolerance 0.08 = 5 sd.
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(4, 5, generator=g) * 2 - 1 for _ in range(2)]
    m = get_method("dare_linear")
    mean = torch.stack([m(xs, drop_rate=0.5, seed=s, scaling=1.0) for s in range(2000)]).mean(dim=0)
    assert (mean - (xs[0] + xs[1]) / 2).abs().max() < 0.08


# ----------------------------------------------------------------------------- task arithmetic
# One adapter, k copies of one adapter, adapter order, float64: tests/test_method_invariants.py.


def test_task_arithmetic_by_hand():
    # 0.5 · ([[1, 2]] + [[3, -4]]) = [[2, -1]]
    assert_close(get_method("task_arithmetic")([t([[1, 2]]), t([[3, -4]])], scaling=0.5), t([[2, -1]]))


# ----------------------------------------------------------------------------- different ranks


def test_linear_merges_adapters_of_different_ranks():
    # rank 2: B1 A1 = e1 e1ᵀ + e2 e2ᵀ;  rank 4: B2 A2 = 2·(e1e1ᵀ + e2e2ᵀ + e3e3ᵀ + e4e4ᵀ) (4 x 5)
    b1, a1 = torch.eye(4)[:, :2], torch.eye(5)[:2]
    b2, a2 = 2 * torch.eye(4), torch.eye(5)[:4]
    d1, d2 = b1 @ a1, b2 @ a2
    expected = t([[1.5, 0, 0, 0, 0], [0, 1.5, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]])
    assert_close(get_method("linear")([d1, d2]), expected)
    assert_close(get_method("knots_ta")([d1, d2], scaling=0.5), expected)
    for name in PER_LAYER:
        out = get_method(name)([d1, d2])
        assert out.shape == (4, 5) and torch.isfinite(out).all(), name


# ----------------------------------------------------------------------------- Iso-C


def test_iso_c_by_hand():
    # diag(3, 0) + diag(0, 1) = diag(3, 1): σ = (3, 1), mean 2 -> 2·U Vᵀ = diag(2, 2)
    out = get_method("iso_c")([t([[3, 0], [0, 0]]), t([[0, 0], [0, 1]])], scaling=1.0)
    assert_close(out, t([[2, 0], [0, 2]]))


def test_iso_c_flattens_the_nonzero_spectrum_of_the_sum():
    xs = [low_rank(12, 9, 2, s) for s in range(3)]  # sum has rank 6 of 9
    s_ta = torch.linalg.svdvals(sum(x.double() for x in xs))
    out = get_method("iso_c")(xs, scaling=0.7)
    s_out = torch.linalg.svdvals(out.double())
    assert torch.allclose(s_out[:6], 0.7 * s_ta[:6].mean().expand(6), rtol=1e-5)
    assert s_out[6:].max() < 1e-5 * s_out[0]  # rank is kept: no null-space directions added


def test_iso_c_on_full_rank_updates_matches_the_paper_formula():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    u, s, vh = torch.linalg.svd(xs[0] + xs[1], full_matrices=False)  # all min(6,4) = 4 values
    torch.testing.assert_close(get_method("iso_c")(xs, scaling=1.0), s.mean() * u @ vh)


# ----------------------------------------------------------------------------- Iso-CTS


def test_iso_cts_splits_the_components_as_the_reference_code():
    # c0 = ⌊f·n⌋, k·p = round((n - c0)/k)·k, c = n - k·p. ViT-B (n = 768, k = 8): c0 = 614,
    # round(154/8) = 19 -> p = 19, c = 616. n = 12, k = 3: c0 = 9, round(1) -> p = 1, c = 9.
    # n = 3, k = 2: c0 = 2, round(0.5) = 0 (Python's banker's rounding, as in the reference) -> p = 0.
    # f = 0, n = 7, k = 2: round(3.5)·2 = 8 > 7 would leave c = -1; lowered to 6 -> (1, 3).
    assert subspace_sizes(768, 8, 0.8) == (616, 19)
    assert subspace_sizes(12, 3, 0.8) == (9, 1)
    assert subspace_sizes(3, 2, 0.8) == (3, 0)
    assert subspace_sizes(7, 2, 0.0) == (1, 3)
    assert subspace_sizes(10, 4, 1.0) == (10, 0)


def iso_cts_reference(xs: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The paper's Iso-CTS written out on full-rank updates: full spectra, no rank cut-off."""
    n, k = min(xs[0].shape), len(xs)
    common = n - round((n - int(n * fraction)) / k) * k
    per_task = (n - common) // k
    u, s, vh = torch.linalg.svd(sum(xs), full_matrices=False)
    u_c = u[:, :common]
    us, ss, vhs = [u_c], [s[:common]], [vh[:common]]
    for x in xs:
        u_t, s_t, vh_t = torch.linalg.svd(x - u_c @ u_c.T @ x, full_matrices=False)
        us, ss, vhs = us + [u_t[:, :per_task]], ss + [s_t[:per_task]], vhs + [vh_t[:per_task]]

    def polar(m):
        p, _, qh = torch.linalg.svd(m, full_matrices=False)
        return p @ qh

    return torch.cat(ss).mean() * polar(torch.cat(us, dim=1)) @ polar(torch.cat(vhs, dim=0))


def test_iso_cts_on_full_rank_updates_matches_the_paper_formula():
    # 12 x 10, k = 3, f = 0.8: n = 10, c = 7 common directions + 1 per task
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(12, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    expected = iso_cts_reference(xs, 0.8)
    torch.testing.assert_close(get_method("iso_cts")(xs, scaling=1.0), expected)
    torch.testing.assert_close(
        get_method("iso_cts")(xs, scaling=1.0, common_space_fraction=0.5), iso_cts_reference(xs, 0.5)
    )
    assert not torch.allclose(expected, get_method("iso_c")(xs), atol=1e-3)  # the task-specific part matters


def test_iso_cts_on_low_rank_updates_keeps_the_rank_of_the_sum():
    # 3 rank-4 updates in 30 x 20: the sum has rank R = 12 (not 20), split c = 9 + 3·1 (see above).
    # Result: rank 12, every singular value α times the mean of the 9 common σ (top of Σ ΔW_i) and
    # of each task's top σ once the common subspace is projected out of it.
    xs = [low_rank(30, 20, 4, s).double() for s in range(3)]
    u, s, _ = torch.linalg.svd(sum(xs), full_matrices=False)
    u_c = u[:, :9]
    task_sigma = [torch.linalg.svdvals(x - u_c @ u_c.T @ x)[0] for x in xs]
    mean = torch.cat([s[:9], torch.stack(task_sigma)]).mean()
    s_out = torch.linalg.svdvals(get_method("iso_cts")(xs, scaling=0.7))
    torch.testing.assert_close(s_out[:12], 0.7 * mean.expand(12))
    assert s_out[12:].max() < 1e-9 * s_out[0]  # no null-space directions added
    # f = 1 leaves no task-specific part: Iso-C
    torch.testing.assert_close(get_method("iso_cts")(xs, common_space_fraction=1.0), get_method("iso_c")(xs))


# ----------------------------------------------------------------------------- TSV-M


def test_tsv_m_on_orthogonal_subspaces_equals_task_arithmetic():
    # ΔW_1 lives on e1, e2 (both sides), ΔW_2 on e3: U_cat and V_cat are already orthonormal.
    d1 = t([[3, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    d2 = t([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    assert_close(get_method("tsv_m")([d1, d2]), d1 + d2)
    xs = [low_rank(16, 12, 2, s) for s in range(3)]  # random: generic, not orthogonal
    q_out = torch.linalg.qr(torch.randn(16, 6, generator=torch.Generator().manual_seed(0)))[0]
    q_in = torch.linalg.qr(torch.randn(12, 6, generator=torch.Generator().manual_seed(1)))[0]
    ortho = [
        q_out[:, 2 * i : 2 * i + 2] @ torch.diag(t([3.0 - i, 1.0])) @ q_in[:, 2 * i : 2 * i + 2].T for i in range(3)
    ]
    assert_close(get_method("tsv_m")(ortho), sum(ortho))
    assert not torch.allclose(get_method("tsv_m")(xs), sum(xs), atol=1e-3)


def test_tsv_m_decorrelates_by_hand():
    # k = 2, 2x2, ⌊2/2⌋ = 1 component each. ΔW_1 = e1 e1ᵀ; ΔW_2 = u2 e1ᵀ with u2 at 45°.
    # U_cat = [e1, u2] (vectors at 0° and 45°): its polar factor turns them symmetrically to
    # -22.5° and 67.5°. V_cat = [e1, e1] = e1 [1 1] has rank 1: polar on its range is e1 [1 1]/√2.
    # ΔW = (u1' + u2')/√2 · e1ᵀ = (cos 22.5°, sin 22.5°)ᵀ e1ᵀ.  (Task arithmetic: (1.707, 0.707)ᵀ e1ᵀ.)
    r = 1 / math.sqrt(2)
    out = get_method("tsv_m")([t([[1, 0], [0, 0]]), t([[r, 0], [r, 0]])])
    assert_close(out, t([[0.9238795, 0], [0.3826834, 0]]))


def test_tsv_m_rank_is_at_most_the_kept_components():
    # k = 4 updates of rank 3 in 30 x 7: ⌊7/4⌋ = 1 component kept per task -> rank <= 4 < 7
    xs = [low_rank(30, 7, 3, s) for s in range(4)]
    u_cat, s_cat, vh_cat = tsv_components(xs)
    assert u_cat.shape == (30, 4) and s_cat.shape == (4,) and vh_cat.shape == (4, 7)
    out = get_method("tsv_m")(xs)
    assert torch.linalg.matrix_rank(out.double(), rtol=1e-5) == 4
    # rank-2 updates, ⌊12/3⌋ = 4 >= 2: only the 2 real components of each are kept -> rank 6
    xs = [low_rank(16, 12, 2, s) for s in range(3)]
    assert tsv_components(xs)[1].shape == (6,)
    assert torch.linalg.matrix_rank(get_method("tsv_m")(xs).double(), rtol=1e-5) == 6


# ----------------------------------------------------------------------------- KnOTS


def test_knots_align_reconstructs_each_update_exactly():
    xs = [low_rank(12, 7, 2, 0), low_rank(12, 7, 3, 1), low_rank(12, 7, 1, 2)]
    u, s, vhs = knots_align(xs)
    assert s.shape == (6,)  # numerical rank of [ΔW_1 | ΔW_2 | ΔW_3] = 2 + 3 + 1
    for x, vh in zip(xs, vhs):
        torch.testing.assert_close(u @ torch.diag(s) @ vh, x.double(), atol=1e-6, rtol=0)
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye)
    v_cat = torch.cat(vhs, dim=1)  # [V_1ᵀ | V_2ᵀ | V_3ᵀ] has orthonormal rows
    torch.testing.assert_close(v_cat @ v_cat.T, eye)
    # same singular values as the SVD of the concatenation formed directly
    direct = torch.linalg.svdvals(torch.cat([x.double() for x in xs], dim=1))[:6]
    torch.testing.assert_close(s, direct)


def test_knots_by_hand():
    # [ΔW_1 | ΔW_2] = [[2,0,0,0],[0,0,0,1]] -> U = I, s = (2, 1), ΣV_1ᵀ = [[2,0],[0,0]],
    # ΣV_2ᵀ = [[0,0],[0,1]]; TIES (density 1): no conflicts -> [[2,0],[0,1]]; times λ = 1.
    out = get_method("knots_ties")([t([[2, 0], [0, 0]]), t([[0, 0], [0, 1]])], density=1.0, scaling=1.0)
    assert_close(out, t([[2, 0], [0, 1]]))


def test_knots_ta_equals_task_arithmetic():
    xs = [low_rank(14, 8, 2, s) for s in range(4)]
    assert_close(get_method("knots_ta")(xs, scaling=0.3), get_method("task_arithmetic")(xs, scaling=0.3))


# ----------------------------------------------------------------------------- purity, dtypes


@pytest.mark.parametrize("name", PER_LAYER)
def test_methods_are_pure_and_keep_the_input_dtype(name):
    for dtype in (torch.float32, torch.bfloat16):  # float64: tests/test_method_invariants.py
        xs = [low_rank(10, 6, 2, s).to(dtype) for s in range(3)]
        before = [x.clone() for x in xs]
        out = get_method(name)(xs)
        again = get_method(name)(xs)
        assert out.dtype == dtype and out.shape == (10, 6)
        assert torch.isfinite(out.float()).all()
        assert torch.equal(out, again)
        assert all(torch.equal(a, b) for a, b in zip(xs, before))


@pytest.mark.parametrize("name", PER_LAYER)
def test_all_zero_updates_merge_to_zero(name):
    out = get_method(name)([torch.zeros(5, 4), torch.zeros(5, 4)])
    assert torch.equal(out, torch.zeros(5, 4))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_takes_density_the_share_kept_as_peft_and_mergekit_name_it(name):
    method = get_method(name)
    assert method.validate({"density": 0.25})["drop_rate"] == 0.75
    assert "density" not in method.validate({"density": 0.25})  # stored under our name
    with pytest.raises(MergeConfigError, match="not both"):
        method.validate({"density": 0.25, "drop_rate": 0.75})
    with pytest.raises(MergeConfigError, match="out of range"):
        method.validate({"density": 0.0})  # keeps nothing: drop_rate 1 is outside [0, 1)
