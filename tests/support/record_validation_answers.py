"""Record a real ComfyUI's answers to the validation corpus (tests/support/validation_corpus.py)
into tests/data/comfyui_validation_answers.json (data: ComfyUI's answers and the
``/object_info`` entries of the classes the corpus uses), for
tests/unit/test_validation_real_comfyui.py.

How it was recorded (ComfyUI 0.3.64, CPU, outside the repository)::

    mkdir -p /tmp/comfy/{input,output,temp,user,custom_nodes,models/checkpoints/sd15}
    printf x > /tmp/comfy/models/checkpoints/sd15/tiny.safetensors
    cp <ComfyUI>/input/example.png /tmp/comfy/input/corpus.png
    cd <ComfyUI> && python main.py --cpu --listen 127.0.0.1 --port 8190 \\
        --base-directory /tmp/comfy --database-url sqlite:///:memory:
    .venv/bin/python -m tests.support.record_validation_answers http://127.0.0.1:8190

Accepted prompts are removed from ComfyUI's queue afterwards (they are not run on purpose).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import validation_corpus as corpus

OUT = Path(__file__).resolve().parents[1] / "data" / "comfyui_validation_answers.json"


def _call(url: str, body: object = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def record(base: str) -> dict[str, Any]:
    _, info = _call(f"{base}/object_info")
    _, stats = _call(f"{base}/system_stats")
    used = sorted({n["class_type"] for _, prompt in corpus.ALL for n in prompt.values()})
    answers: dict[str, Any] = {}
    for name, prompt in corpus.ALL:
        status, body = _call(f"{base}/prompt", {"prompt": prompt, "client_id": "recorder"})
        if status == 200:
            body = {"node_errors": body["node_errors"]}  # id and number vary
        answers[name] = {"status": status, "body": body}
    _call(f"{base}/queue", {"clear": True})
    _call(f"{base}/interrupt", {})
    return {
        "comfyui_version": stats["system"]["comfyui_version"],
        "python_version": stats["system"]["python_version"].split()[0],
        "object_info": {name: info[name] for name in used if name in info},
        "answers": answers,
    }


def main() -> None:
    recorded = record(sys.argv[1].rstrip("/"))
    OUT.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(recorded['answers'])} answers -> {OUT}")


if __name__ == "__main__":
    main()
