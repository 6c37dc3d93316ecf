"""Small builders shared by the hostile cases (files are made fresh under each test's tmp folder)."""

import json
from pathlib import Path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path
