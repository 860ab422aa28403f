"""`iadgpt quickstart`: the whole IADGPT pipeline on one CPU within a wall-time budget, and the
evidence that its training teaches a Qwen2.5-VL model to inspect products it has never seen.

    iadgpt quickstart --out runs/quickstart                 # 15 minutes on 2 CPU cores
    iadgpt quickstart --out runs/quickstart --ablations     # then the ablation table (longer)

Phases, in order; each is recorded in OUT/state.json when it finishes, so a rerun of the same
command skips what is done (an interrupted training stage resumes from its last checkpoint):

  factory       synthetic products (`iadgpt.data.factory`): many training categories with few images
                each, and disjoint held-out categories (indices from 10000) for the benchmark
  model         a random-weight Qwen2.5-VL of the `small` preset; times inference for the budget
  stage1_data   caption records; stage2_data: discrepancy tasks; stage3_data: few-shot detection,
                localisation and reasoning (the library functions behind data_builders/)
  train1..3     the training loop users launch with accelerate (`iadgpt.training.loop.train`), each
                stage from a YAML written to OUT/configs/ that train/train.py reads unchanged
  detection     the few-shot benchmark (`run_detection`) on the held-out categories, k = 0, 1, 2, 4
  baseline      nearest-patch matching (PatchCore-style) on the same manifest, through the same benchmark
  report        OUT/report.json + report.md by defect kind and local defect type (`iadgpt.evaluation.by_kind`),
                an example chat

The budget (`--minutes`) is kept by shortening training, never by overrunning: data phases are
measured as they run, evaluation is estimated from timed forward passes of the untrained model, and
what is left is split over the training stages (stage_shares). Each stage first times a few
batches for a first step count, then re-fits the count to its minutes from the pace it measures
as it trains (`fit_steps_to_minutes`), so the cosine schedule completes even when the probe ran on a
busy machine; `max_minutes` is the hard stop. A budget that leaves too little training time is
refused before any work starts.

The package: `settings` (what a run does, its folder and state), `budget` (the cost model),
`pipeline` (the phases), `report` (report.json / report.md), `ablations` (`--ablations`) and `cli`.
"""

from .cli import add_arguments, run
from .pipeline import Quickstart, read_losses, run_quickstart
from .report import PAIRED_NAMES, pooled_paired_table
from .settings import BudgetTooShortError, QuickstartError, QuickstartPaths, QuickstartSettings, RunState, prepare_output

__all__ = [
    "PAIRED_NAMES", "BudgetTooShortError", "Quickstart", "QuickstartError", "QuickstartPaths", "QuickstartSettings",
    "RunState", "add_arguments", "pooled_paired_table", "prepare_output", "read_losses", "run", "run_quickstart",
]
