"""Analyses behind the paper's tables and figures: its numbers (``paper``), FLOPs and
parameters (``flops``), and the Fourier analysis of the block outputs (``fourier``)."""
