"""The benchmark's worker process: `python -m coreml_sd.bench.worker measure TASK.json OUT.json`
measures one backend (a Task written by runner.py) into OUT.json; `make-random FOLDER CONFIG SEED`
writes the random-weight model. Progress goes to stderr."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def _progress(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) == 3 and argv[0] == "measure":
        from coreml_sd.bench.measure import Task, measure_run

        task = Task.from_dict(json.loads(Path(argv[1]).read_text()))
        entry = measure_run(task, _progress)
        Path(argv[2]).write_text(json.dumps(entry))
        return 0
    if len(argv) == 4 and argv[0] == "make-random":
        from coreml_sd.bench.models import write_random_model

        _progress(f"writing the random-weight {argv[2]} model to {argv[1]} (once)")
        write_random_model(Path(argv[1]), argv[2], seed=int(argv[3]))
        return 0
    print("usage: python -m coreml_sd.bench.worker measure TASK.json OUT.json | make-random FOLDER CONFIG SEED",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
