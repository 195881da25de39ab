"""Reports from finished runs: collect (files -> DataFrames), tables (paper-shaped), plots (PNG)."""
