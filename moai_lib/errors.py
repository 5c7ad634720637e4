"""The root of the errors moai reports to users.

Every error raised for bad input (a config, params file, corpus, tokenizer, checkpoint, quantization setting,
unavailable backend or tracking server) derives from `MoaiError`: its message names the problem and the fix, so
the `moai` command prints it as one line instead of a traceback. Each subclass also keeps its conventional
builtin base (`ValueError` for bad values, `RuntimeError` for an unavailable resource).
"""


class MoaiError(Exception):
    """Bad input or an unusable environment, explained in the message (what is wrong, and how to fix it)."""
