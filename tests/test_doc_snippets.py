"""Every python snippet of the README and docs/ runs as written (one namespace per file, in order).
Snippets that set `device = "cuda"` run only where a GPU is visible."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def snippets(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", (ROOT / name).read_text(), re.S)


@pytest.mark.parametrize("name", [f for f in FILES if snippets(f)])
def test_snippets_run_as_written(name, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__snippet__"}
    for i, code in enumerate(snippets(name)):
        if 'device = "cuda"' in code and not torch.cuda.is_available():
            continue
        exec(compile(code, f"{name} snippet {i}", "exec"), namespace)
