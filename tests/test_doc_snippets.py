"""The README and docs/ run as written.

- Every python snippet runs (one namespace per file, in order). Snippets that set `device = "cuda"` run
  only where a GPU is visible. A `print(...)  # text` line must print something that starts with `text`
  (a trailing "..." allows more; comments starting with "e.g." are examples, not checked).
- Every command line of the example scripts (`python examples/train.py ...`, `python examples/sample.py
  ...`) runs, in a scratch folder, with training cut to one step.
- The main job (`python -m sparsezoo.compare`) prints its table and notes and no profiler noise.
"""

import builtins
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

import sparsezoo

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
FENCE_LANGUAGES = {"python", "bash", "yaml", "text"}


def snippets(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", (ROOT / name).read_text(), re.S)


def expected_prints(code: str) -> dict[int, str]:
    """Line number -> the text a `print(...)  # text` line promises."""
    out = {}
    for number, line in enumerate(code.splitlines(), 1):
        m = re.match(r"\s*print\(.*\)\s+#\s*(.+)$", line)
        if m and not m.group(1).startswith("e.g."):
            out[number] = m.group(1).removesuffix("...").rstrip()
    return out


@pytest.mark.parametrize("name", [f for f in FILES if snippets(f)])
def test_snippets_run_as_written(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    printed: dict[tuple[str, int], str] = {}

    def recording_print(*args, **kwargs):
        frame = sys._getframe(1)
        text = io.StringIO()
        builtins.print(*args, **{**kwargs, "file": text})
        printed.setdefault((frame.f_code.co_filename, frame.f_lineno), text.getvalue())
        builtins.print(*args, **kwargs)

    namespace = {"__name__": "__snippet__", "print": recording_print}
    for i, code in enumerate(snippets(name)):
        if 'device = "cuda"' in code and not torch.cuda.is_available():
            continue
        where = f"{name} snippet {i}"
        exec(compile(code, where, "exec"), namespace)
        for line, want in expected_prints(code).items():
            got = printed.get((where, line))
            assert got is not None and got.startswith(want), f"{where}, line {line}: printed {got!r}, says {want!r}"


@pytest.mark.parametrize("name", FILES)
def test_every_code_block_names_its_language(name):
    """A block fenced as ```py, or with no language, would be skipped above without a word."""
    text = (ROOT / name).read_text()
    opening = re.findall(r"^```(\S*)\n(?:.*?\n)?```$", text, re.S | re.M)
    assert set(opening) <= FENCE_LANGUAGES, (name, sorted(set(opening) - FENCE_LANGUAGES))


COMMAND = re.compile(
    r"^(python examples/(?:train|sample)\.py [^`\n]*)|`(python examples/(?:train|sample)\.py [^`\n]*)`", re.M
)
ONE_STEP = ["--set", "train.steps=1", "--set", "train.eval_batches=1", "--set", "train.progress=false"]


def example_commands() -> list[list[str]]:
    """Every `python examples/train.py|sample.py ...` line of the README and docs (code blocks and inline
    code), once each, training commands first."""
    found = [m.group(1) or m.group(2) for name in FILES for m in COMMAND.finditer((ROOT / name).read_text())]
    commands = [shlex.split(c) for c in dict.fromkeys(found)]
    return sorted(commands, key=lambda c: "sample" in c[1])


def test_example_commands_run(tmp_path, monkeypatch, capsys):
    commands = example_commands()
    assert any("model.layers=[dense, dense, msa, msa]" in c for c in commands)
    for folder in ("configs", "examples", "sparsezoo"):  # what the commands and configs/gpt_tiny.yaml name
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    from sparsezoo.models.train import main as train_main

    sample_main = None
    for command in commands:
        assert command[0] == "python", command
        if command[1] == "examples/train.py":
            summary = train_main([*command[2:], *ONE_STEP])
            assert summary["steps_done"] == 1, command
        else:
            if sample_main is None:
                import importlib.util

                spec = importlib.util.spec_from_file_location("sample_example", ROOT / "examples" / "sample.py")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sample_main = module.main
            sample_main([*command[2:], "--device", "cpu"])
        assert "GPT:" in capsys.readouterr().out, command


def test_main_job_prints_its_table_and_notes_and_no_profiler_noise(tmp_path, capfd):
    from sparsezoo import compare

    job = tmp_path / "job.yaml"  # the default job, shorter
    job.write_text("seq_len: 128\nrepeats: 2\n")
    rows = compare.main(["--config", str(job), "--out", str(tmp_path)])
    out, err = capfd.readouterr()
    assert {r["variant"] for r in rows} == set(sparsezoo.list_variants())
    assert all(r["forward_iqr_ms"] >= 0 and r["forward_blocks"] >= 2 for r in rows)
    assert "| variant | rel. error vs dense | forward ms, median (IQR) |" in out
    for note in ("rel. error vs dense", "KV read, mean per query", "forward ms"):
        assert f"- **{note}**" in out
    assert (tmp_path / "compare.md").read_text().count("How to read it") == 1
    assert "median over 2 timed blocks" in out
    assert "csa has no place for the dense weights ['v_proj.weight']: left out" in out + err  # shared K = V
    for noise in ("USDT", "profiler_start", "profiler_stop", "Visualization saved"):
        assert noise not in out and noise not in err, noise
