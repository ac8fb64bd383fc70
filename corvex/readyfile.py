"""Ready files: how a process tells its supervisor (corvex serve, tests) it is serving.

The file appears atomically (written aside, then renamed) and holds the bound ports as JSON,
so a supervisor that asked for port 0 learns which port it got.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write(path: str, **ports: int) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
    tmp.replace(path)
