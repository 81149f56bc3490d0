"""`python -m edgespec.bench --worker JOB --result OUT`: the bench's worker process (see edgespec.bench.run)."""

import sys

from edgespec.bench.run import worker_main

sys.exit(worker_main())
