"""flaresam: Segment Anything (HQ-SAM, SAM) and dense baselines on FLARE22-style abdominal CT.

The package root stays light (no torch import) so that commands such as
``flaresam score`` start quickly.
"""

__version__ = "0.5.0"
