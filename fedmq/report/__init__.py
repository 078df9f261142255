"""Reports of federations for people: ``fedmq report`` and the plots ``fedmq simulate`` draws.

- :mod:`~fedmq.report.history`: a state directory read without disturbing its service.
- :mod:`~fedmq.report.build`: the HTML page, its PNG plots and ``rounds.csv``.
- :mod:`~fedmq.report.plots`: per-round figures (matplotlib, imported only there).
- :mod:`~fedmq.report.formatting`: sizes and table cells, shared with the simulator's report.

Nothing is imported here, so ``fedmq.report.formatting`` works without matplotlib.
"""
