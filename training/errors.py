"""The training exception: every user-facing failure of `loragate train` becomes one `TrainingError` line.

Causes raised inside the package (all `ValueError`s, each with a one-line message): `RecipeError` (recipe.py),
`DataError` (data.py), `LintError` (lint.py), `PreflightError` (preflight.py), `PublishError` (publish.py).
"""

from __future__ import annotations


class TrainingError(ValueError):
    """A run that cannot start or finish for a reason the user can fix; `str()` is the one-line message."""
