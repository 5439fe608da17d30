"""Rewrite passes (installed as `lincompile.passes`), one module each, run in this order:

    capture → match → substitute → fuse → verify        (then heal, emit)

Each pass takes the pipeline state and returns/updates it; `lincompile diff` shows what each one changed.
"""

PASS_ORDER = ("capture", "match", "substitute", "fuse", "verify")
