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
