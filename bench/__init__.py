"""kdflow benchmarks, side by side with the tools users would otherwise pick: `python -m bench` runs them all.

Importing the package sets OMP_WAIT_POLICY=PASSIVE unless it is already set. torch's OpenMP threads
otherwise spin while they wait, and with other processes on the cores (a shared machine, a busy laptop)
one CPU training step of the demo student ran over 10x slower, which buried every comparison in noise.
libgomp reads the variable when torch loads it, so it is set here, before any benchmark imports torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
