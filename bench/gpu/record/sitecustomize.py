"""The CPU rehearsal's import recorder (bench/gpu/check.sh --cpu puts this folder on PYTHONPATH):
at exit, each Python process writes the top-level modules it imported, each with its file, to
$PIPELINE_RECORD_IMPORTS/<pid>.txt (`name<TAB>file`; built-in modules have no file)."""

import atexit
import os
import sys

_DIR = os.environ.get("PIPELINE_RECORD_IMPORTS")


def _write() -> None:
    os.makedirs(_DIR, exist_ok=True)
    lines = []
    for name in sorted({n.split(".")[0] for n in list(sys.modules)}):
        module = sys.modules.get(name)
        lines.append(f"{name}\t{getattr(module, '__file__', None) or ''}")
    with open(os.path.join(_DIR, f"{os.getpid()}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if _DIR:
    atexit.register(_write)
