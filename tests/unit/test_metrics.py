"""metrics.jsonl writing and resume truncation, summary table, PNG plots."""

import json

from megatron_gppo.config import LoggingConfig
from megatron_gppo.metrics import MetricsLogger, read_metrics, summary_table
from megatron_gppo.plots import compare_runs, write_run_plots

QUIET = LoggingConfig(wandb_mode="disabled", progress=False)


def fake_step(step):
    return {"reward_mean": 0.1 * step, "entropy": 1.0 / step, "clip_frac_low": 0.01, "clip_frac_high": 0.02,
            "beta1": 0.5, "beta2": 1.0, "response_length_mean": 10.0 + step}


def test_log_then_resume_drops_steps_after_the_checkpoint(tmp_path):
    logger = MetricsLogger(run_dir=tmp_path, config=QUIET, run_config={}, max_steps=5)
    for step in range(1, 5):
        logger.log(step, fake_step(step))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    # A crash after the step-2 checkpoint: the resumed run rewrites steps 3.. itself.
    resumed = MetricsLogger(run_dir=tmp_path, config=QUIET, run_config={}, max_steps=5, start_step=2)
    resumed.log(3, fake_step(3))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2] == {"step": 3, **fake_step(3)}


def test_resume_drops_a_line_cut_short_by_a_kill(tmp_path):
    logger = MetricsLogger(run_dir=tmp_path, config=QUIET, run_config={}, max_steps=5)
    for step in range(1, 4):
        logger.log(step, fake_step(step))
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + json.dumps({"step": 4, **fake_step(4)})[:25])  # SIGKILL mid-write
    MetricsLogger(run_dir=tmp_path, config=QUIET, run_config={}, max_steps=5, start_step=3).log(4, fake_step(4))
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_summary_table_reports_first_last_best(tmp_path):
    records = [{"step": s, **fake_step(s)} for s in (1, 2, 3)]
    records[1]["eval_accuracy"] = 0.5
    table = summary_table(records)
    reward_row = next(line for line in table.splitlines() if line.startswith("reward_mean"))
    assert "0.1 (step 1)" in reward_row and "0.3 (step 3)" in reward_row
    assert "eval_accuracy" in table
    # Every row has a best, or says there is none, and the table says which is which.
    entropy_row = next(line for line in table.splitlines() if line.startswith("entropy"))
    assert reward_row.split()[-1] == "0.3" and entropy_row.split()[-1] == "-"
    assert table.splitlines()[-1].startswith("best: the highest reward")


def test_plots_are_written_for_panels_with_data(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, **fake_step(s)}) + "\n" for s in (1, 2, 3)))
    written = {p.name for p in write_run_plots(tmp_path)}
    # Constant betas (a constant schedule) are not worth a plot of two flat lines.
    assert written == {"reward.png", "entropy.png", "clip_fractions.png", "response_length.png", "summary.png"}
    for path in (tmp_path / "plots").iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    switched = [{"step": s, **fake_step(s), "beta1": 0.0 if s < 3 else 0.5} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in switched))
    assert "betas.png" in {p.name for p in write_run_plots(tmp_path)}
    out = compare_runs({"a": tmp_path, "b": tmp_path}, key="entropy", output=tmp_path / "cmp.png")
    assert out.stat().st_size > 1000
