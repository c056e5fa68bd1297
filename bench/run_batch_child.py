"""vLLM's own `run-batch` on the CPU build, as a child of bench/runbatch.py:

    python bench/run_batch_child.py -i in.jsonl -o out.jsonl --model DIR [vllm flags]

The `vllm` console script of the CPU build crashes on its own version lookup
(docs/engines.md): importing our `vllm serve` launcher answers it (also in vLLM's spawned
engine-core process, which imports this file again as `__mp_main__`), then vLLM's CLI runs
`run-batch` unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import offline_queue.engines.vllm_server  # noqa: F401  (the version answer, at import)

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "run-batch", *sys.argv[1:]]
    main()
