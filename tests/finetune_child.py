"""One fine-tuning run in a process of its own, for the test that kills it with SIGKILL.

    python -m tests.finetune_child request.json

The request (JSON) names the photos, settings and checkpoint folder; the frozen head's
arrays are in a safetensors file beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

from core.learning import finetune as ft
from core.learning import finetune_config as fc


def main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    ft.finetune(
        [tuple(item) for item in request["train"]], [tuple(item) for item in request["val"]],
        backbone_id=request["backbone"], classes=request["classes"], config=fc.FinetuneConfig(**request["config"]),
        head_arrays=load_file(request["head"]), head_classes=request["head_classes"],
        checkpoint_dir=Path(request["checkpoint_dir"]),
    )


if __name__ == "__main__":
    main(sys.argv[1])
