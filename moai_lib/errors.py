"""The root of the errors moai reports to users.

Every error raised for bad input (a config, params file, corpus, tokenizer, checkpoint, quantization setting,
unavailable backend or tracking server) derives from `MoaiError`: its message names the problem and the fix, so
the `moai` command prints it as one line instead of a traceback. Each subclass also keeps its conventional
builtin base (`ValueError` for bad values, `RuntimeError` for an unavailable resource).
"""


class MoaiError(Exception):
    """Bad input or an unusable environment, explained in the message (what is wrong, and how to fix it)."""


def check_integer(value, label: str, minimum: int, error: type[MoaiError], *, optional: bool = False,
                  none_word: str = "None") -> None:
    """Raise `error` unless `value` is an int (not a bool) ≥ `minimum`, or None when `optional`; the message names
    `label` and what it must be."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(f"{label} must be an integer ≥ {minimum}{f' or {none_word}' if optional else ''}, got {value!r}")
