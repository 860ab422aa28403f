"""The wall-time budget: what each phase costs on a 2-core CPU, and the minutes left for training."""

from __future__ import annotations

from collections.abc import Callable

from .settings import COSTS, BudgetTooShortError, QuickstartSettings

# --------------------------------------------------------------------------------------------------
# Budget


def held_out_queries_estimate(settings: QuickstartSettings) -> int:
    """Test images of the held-out categories, before the factory has made them."""
    from ..data.factory import LOCAL_KINDS

    kinds = len(LOCAL_KINDS) + 1.5  # in-context: wrong_color everywhere, count or pattern in 4 of 9 families
    per_category = settings.held_out_test_normals + kinds * settings.held_out_anomalies_per_kind
    return round(settings.held_out_categories * per_category)


def evaluation_seconds(settings: QuickstartSettings, queries: int, forward: Callable[[int], float]) -> float:
    """Benchmark, baseline and report time for `queries` test images, `forward(k)` s per query."""
    runs = [(k, 1 if k == 0 else settings.seeds) for k in settings.shots]
    scoring = sum(seeds * queries * forward(k) for k, seeds in runs)
    metrics = sum(seeds for _, seeds in runs) * queries * COSTS.map_metrics
    baseline = sum(seeds * queries * COSTS.baseline_query for k, seeds in runs)
    by_defect = 2 * dict(runs)[report_k(settings)] * queries * COSTS.defect_metrics  # model and baseline
    paired = 2 * dict(runs)[report_k(settings)] * queries * COSTS.map_metrics  # both again, per category
    return scoring + 4 * metrics + baseline + by_defect + paired + COSTS.report  # metrics: model and baseline, benchmark and report


def report_k(settings: QuickstartSettings) -> int:
    """The k of the report's example chat and of its defect types: the targets' 2 if evaluated."""
    return 2 if 2 in settings.shots else max(settings.shots)


def data_seconds(settings: QuickstartSettings) -> float:
    """Factory and stage-data time, before they have run."""
    from ..data.factory import LOCAL_KINDS

    per_train_category = settings.train_normals + settings.train_test_normals + \
        (len(LOCAL_KINDS) + 1.5) * settings.train_anomalies_per_kind
    per_in_context_category = settings.train_normals + settings.train_test_normals + \
        1.5 * settings.in_context_anomalies_per_kind
    images = settings.train_categories * per_train_category + held_out_queries_estimate(settings) + \
        settings.held_out_categories * settings.held_out_train_normals + \
        settings.in_context_categories * per_in_context_category
    records = settings.stage1_records * (1 in settings.stages) + settings.stage3_records
    return images * COSTS.factory_image + records * COSTS.record + \
        settings.stage2_records * COSTS.stage2_record * (2 in settings.stages)


def check_budget(settings: QuickstartSettings) -> None:
    """Refuse, before any work, a budget that cannot hold data, evaluation and a little training."""
    fixed = data_seconds(settings) + evaluation_seconds(settings, held_out_queries_estimate(settings),
                                                        lambda k: COSTS.query_forward * (1 + k) / 3)
    fixed += COSTS.stage_overhead * len(settings.stages)
    needed = fixed + COSTS.minimum_training * len(settings.stages)
    if settings.minutes * 60 < needed:
        raise BudgetTooShortError(
            f"a budget of {settings.minutes:g} minutes is too short to train anything: data and evaluation alone "
            f"take about {fixed / 60:.1f} minutes, and training needs at least "
            f"{COSTS.minimum_training * len(settings.stages) / 60:.1f} more; use --minutes {needed / 60 + 0.5:.0f} "
            "or more")


def training_seconds(settings: QuickstartSettings, elapsed: float, evaluation: float) -> dict[int, float]:
    """Seconds of each training stage: what the budget leaves after the time spent and evaluation."""
    left = settings.minutes * 60 - elapsed - evaluation - COSTS.stage_overhead * len(settings.stages)
    left *= 0.97  # headroom for the run-to-run jitter of a shared machine
    minimum = COSTS.minimum_training * len(settings.stages)
    if left < minimum:
        raise BudgetTooShortError(
            f"after {elapsed / 60:.1f} minutes of data preparation and with about {evaluation / 60:.1f} minutes of "
            f"evaluation ahead, a budget of {settings.minutes:g} minutes leaves {max(left, 0) / 60:.1f} minutes for "
            f"training, less than the {minimum / 60:.1f} it needs; use a larger --minutes")
    return split_over_stages(settings, left)


def split_over_stages(settings: QuickstartSettings, seconds: float) -> dict[int, float]:
    """`seconds` of training shared by the stages in proportion to their `stage_shares`."""
    shares = {stage: settings.stage_shares[stage - 1] for stage in settings.stages}
    total = sum(shares.values())
    return {stage: seconds * share / total for stage, share in shares.items()}
