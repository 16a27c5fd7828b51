"""The serve load test as a script: `python -m memlm.bench.serve_load [memlm bench serve options]`.

The committed results came from:

    .venv/bin/memlm bench serve --workload mixed --clients 1,4,16,64 --max-tokens 64 --threads 2 --seconds 60 \
        --memory bench/models/chain-sum-memgen --json bench/results/serve.json --plot bench/results/serve.png
    .venv/bin/memlm bench serve --workload plain --clients 1,4,16,64 --max-tokens 64 --threads 2 --seconds 60 \
        --json bench/results/serve_plain.json --plot bench/results/serve_plain.png
"""

import runpy
import sys

if __name__ == "__main__":
    # `python -m memlm bench serve ...`: run as the command line's entry point, not imported, so
    # memlm.bench does not depend on memlm.cli (which depends on memlm.bench).
    sys.argv = [sys.argv[0], "bench", "serve", *sys.argv[1:]]
    runpy.run_module("memlm", run_name="__main__")
