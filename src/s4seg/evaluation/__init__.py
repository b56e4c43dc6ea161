"""Evaluation: confusion-matrix metrics (`metrics`), tile and sliding-window inference (`sliding`),
pseudo-label quality and dumps.

Import the submodules directly. This file imports nothing on purpose: `metrics` and the pseudo-label
quality code are used by torch-free readers (the report), while `sliding` needs torch.
"""
