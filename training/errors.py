"""The training exception tree: every failure of a run (or a merge) that the user can fix.

    TrainingError            base class (a ValueError); str(exc) is one line fit for a user
    ├── RecipeError          the recipe cannot be loaded or resolved (recipe.py; model.py, plan.py)
    ├── DataError            the dataset cannot be read, or a row is malformed (data.py)
    ├── LintError            the adapter the recipe would produce cannot be served as a LoRA (serving_lint.py)
    ├── PlanError            the run would not fit in the GPU's memory with headroom (plan.py)
    ├── PreflightError       the loss mask is wrong for an example (preflight.py)
    ├── CheckError           a post-training check failed; outputs kept, nothing published (checks.py)
    ├── PublishError         the registry refused the run's adapter (publish.py)
    └── MergeError           the merge cannot run on these inputs (merge.py, merge_cli.py)
        └── MergeRefused     the merged model does not answer like base + adapter; nothing written

`loragate train` and `loragate merge` print a `TrainingError` as one line (exit status 2). Any other exception
raised during a run (by transformers, PEFT, torch, or a bug here) keeps its traceback.
"""

from __future__ import annotations


class TrainingError(ValueError):
    """A run that cannot start or finish for a reason the user can fix; `str()` is the one-line message."""
