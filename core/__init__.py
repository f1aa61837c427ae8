"""Catalog Lens' core: everything the app, the command line and the benchmarks share.

OpenMP threads (torch's intra-op pool on Linux and Windows) wait for work by spinning by
default. When another process needs a core, a spinning thread holds it while the thread
it waits for is not running, and the network all but stops: measured on a loaded 2-core
machine, 0.6 photos/s spinning against 10.2 waiting passively, the same forward pass
(issue 12). The policy is read once, when torch loads its OpenMP library, so it is set
here, before any module of the package imports torch; a value the user set wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
