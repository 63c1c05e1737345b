"""The benchmark's command (`python3 bench/run.py --help`; the code is the package bench/, bench/cli.py first).
Each worker is this script again in a fresh process (`--worker KIND --spec JSON`)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder is first on sys.path: bench's modules would be top-level names (`model`,
# `train`...) shadowing any others. The package is imported from the repository root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
