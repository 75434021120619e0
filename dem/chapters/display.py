"""How a chapter shows what is not a figure, for every chapter (tutorial and sweep)."""

from __future__ import annotations


def chapter_display() -> None:
    """How a chapter shows what is not a figure: tables also as Markdown (``dem publish``
    writes them so instead of HTML), and a split smaller than asked as one plain note."""
    import warnings

    from dem.sources.core import SmallSplitWarning

    default_show = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, SmallSplitWarning):
            print(f"note: {message}")
        else:
            default_show(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        import pandas as pd

        markdown = shell.display_formatter.formatters["text/markdown"]
        markdown.for_type(pd.DataFrame, lambda table: table.to_markdown())
