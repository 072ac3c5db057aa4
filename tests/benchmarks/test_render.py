"""The README's and the docs' measured figures are rendered from the committed result files, and checked."""

import json
import shutil

import pytest

from benchmarks import render
from benchmarks.results_data import RESULTS_DIR, read_result


def test_every_rendered_table_in_the_docs_is_its_result_files_rendering():
    assert render.stale_tables() == []  # else: python -m benchmarks.render, and commit the tables
    assert render.main(["--check"]) == 0


def test_a_result_that_changes_makes_its_table_stale(tmp_path, monkeypatch):
    for relative in render.RENDERED_FILES:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(render.PROJECT_ROOT / relative, tmp_path / relative)
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results)
    job = json.loads((results / "main-job.json").read_text())
    job["figures"]["test_bpd"] = 1.5
    (results / "main-job.json").write_text(json.dumps(job))
    monkeypatch.setattr(render, "read_result", lambda name: read_result(name, results))
    assert render.stale_tables(tmp_path) == ["README.md: headline"]
    assert "test 1.500 ± 0.0016 bits/dim" in render.render_text((tmp_path / "README.md").read_text())


def test_an_unknown_table_is_refused_by_name():
    with pytest.raises(ValueError, match="doc.md: unknown rendered table 'nope'"):
        render.render_text("<!-- rendered: nope -->\nx\n<!-- /rendered -->", "doc.md")


def test_the_main_job_result_is_the_tracked_runs(store):
    from benchmarks import main_job
    from experiments import density
    from tests.experiments.test_density import TINY

    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    result = main_job.record(run_id)
    figures = result["figures"]
    assert figures["status"] == "FINISHED" and figures["dataset"] == "digits8x8" and figures["epochs"] == 2
    assert figures["test_bpd"] > 0 and 0 < figures["eval_cpu_fraction"] < 1 and figures["wall_seconds"] > 0
    assert main_job.main(["--from-run", run_id, "--output-dir", str(store / "out")]) == 0
    written = json.loads((store / "out" / "main-job.json").read_text())
    assert written["figures"] == figures and {"cpu_model", "torch", "commit"} <= set(written["provenance"])


def test_the_budget_curve_is_drawn_from_its_result_file(tmp_path):
    points = render.budget_points()
    assert set(points) == {"iresnet", "glow"} and [b for b, _, _ in points["iresnet"]] == [174.0, 348.0, 696.0, 1392.0]
    render.plot_budget_curve(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_table_row_names_the_machine_and_a_commit_with_local_changes(tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results)
    step = json.loads((results / "step-time.json").read_text())
    step["provenance"]["commit"] = "0123456789abcdef+dirty"
    (results / "step-time.json").write_text(json.dumps(step))
    monkeypatch.setattr(render, "read_result", lambda name: read_result(name, results))
    assert "commit 0123456789 with local changes (`step-time.json`)" in render.step_time()


def test_a_benchmark_result_carries_its_provenance_and_command(tmp_path, capsys):
    from benchmarks.common import emit

    emit("a table", str(tmp_path / "r.json"), {"config": {"device": "cpu"}, "results": [1]})
    written = json.loads((tmp_path / "r.json").read_text())
    assert capsys.readouterr().out == "a table\n" and written["results"] == [1]
    assert written["provenance"]["device"] == "cpu" and {"cpu_model", "torch", "commit"} <= set(written["provenance"])
    assert written["command"].startswith("python -m ")


def test_markdown_tables_have_one_line_per_row():
    from benchmarks.tables import markdown_table

    assert markdown_table(("a", "b"), [(1, "x"), (2, "y")]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |\n"
