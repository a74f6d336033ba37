"""scripts/quality_probe.py's options and scripts/quality_probe_table.py's table, without training."""

import json

from tests.test_quality_tools import load_example


def load_script(name: str):
    return load_example(name, folder="scripts")


def test_probe_options_build_a_ladder_and_its_eval_lengths():
    probe = load_script("quality_probe")
    args = probe.parse(["--curriculum", "128:400,512:200", "--pairs", "8", "--keys", "96", "--values", "80"])
    card = probe.probe_card(probe.load_study(), args)
    assert card["curriculum"] == [[128, 400], [512, 200]]
    assert card["tasks"]["mqar"]["n_pairs"] == 8 and card["tasks"]["mqar"]["n_keys"] == 96
    assert card["tasks"]["mqar"]["n_values"] == 80
    assert probe.eval_lengths(args, card) == [128, 512, card["train_len"]]
    none = probe.parse(["--curriculum", "none", "--eval-lens", "64,128"])
    assert probe.probe_card(probe.load_study(), none)["curriculum"] == []
    assert probe.eval_lengths(none, card) == [64, 128]


def test_table_reports_each_stage_and_its_seconds_per_step(tmp_path):
    table = load_script("quality_probe_table")
    record = {
        "variant": "dense",
        "task": "mqar",
        "seed": 0,
        "steps_done": 40,
        "run": {
            "data": {"curriculum": [[128, 20]], "seq_len": 1024},
            "train": {"steps": 40, "batch_size": 1, "lr": 3e-3},
        },
        "evals": [{"step": 40, "phase": "n/a", "recall@1024": {"loss": 0.1, "token_acc": 0.9, "exact": 0.5}}],
        "history": [{"step": s, "tokens_per_s": 1024 / (0.5 if s < 20 else 2.0)} for s in range(9, 40, 10)],
    }
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(record))
    text = table.main([str(path)])
    row = text.splitlines()[-1]
    assert "128×20" in row and "1024: 0.90 / 0.50" in row
    assert "128: 0.500, 1024: 2.000" in row
