"""``vlm-ros bench``: the fast path against transformers' generate() in the same run, JSON +
Markdown results (``measure``)."""
