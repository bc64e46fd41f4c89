"""What the example trainers share, by concern; each trainer file holds its method alone.

- :mod:`training.distributed`: processes, ``torchrun``, DDP, and how a process ends.
- :mod:`training.data`: datasets, the resumable sampling, the start-up check of images.
- :mod:`training.options`: the shared command line, presets, recipes, the ViT.
- :mod:`training.optim`: schedules, parameter groups, the checked optimizer step, EMA.
- :mod:`training.rundir`: the output directory (lock, refusals, probe) and ``log.csv``.
- :mod:`training.checkpoints`: checkpoints that are finite, checksummed and verified.
- :mod:`training.runs`: :class:`~training.runs.Run`, the loop's bookkeeping and ``--resume``.
- :mod:`training.faults`: faults on demand, for the tests.

Each fault a run can meet is handled in one of these modules, and tested in the test module of
the same name (``tests/test_runs.py``, ``tests/test_checkpoints.py``...).
"""
