"""Old import path of :class:`~fedmq.strategies.layout.ModelLayout`; import it from there.

Kept only while ``fedmq/coordinator/validation.py`` and ``bench/aggregate.py`` still
import it from here; delete this module once they import ``fedmq.strategies.layout``.
"""

from fedmq.strategies.layout import ModelLayout

__all__ = ["ModelLayout"]
