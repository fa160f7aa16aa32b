"""The speed benchmark behind ``tools/analysis/benchmark.py``, in parts that can be reused:

- ``timing``: :class:`~restv2_mm.benchmark.timing.Bench`, isolated measurements with CUDA
  events and peak memory, and the best-of-rounds bookkeeping;
- ``models``: the models compared (ResTv2, mmdet's Swin-T and PVTv2-b2, timm's ConvNeXt-T,
  whole Mask R-CNN and UperNet models from their configs) and their inputs;
- ``sections``: what each section of the benchmark measures;
- ``targets``: the ratios of the same run and the speed targets they are held to;
- ``report``: the printed table, the JSON and the plot.
"""
