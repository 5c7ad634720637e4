"""`PipelineError`: the one error type of the pipeline's params and stages.

It lives in its own module so that every stage module (evaluation, export, ...) and the params parser can
raise it without importing each other.
"""

from __future__ import annotations

from ..errors import MoaiError


class PipelineError(MoaiError, ValueError):
    """Invalid pipeline params or inputs; the message names the param (e.g. "evaluate.batch_size") and the fix."""
