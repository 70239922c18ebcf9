"""python -m spacedkd_fast.repro end to end on a tiny budget: every setting runs and the report answers."""

import json

from spacedkd_fast import repro


def test_repro_runs_every_setting_and_writes_the_report(tmp_path):
    out = tmp_path / "study"
    code = repro.main(["--subset", "128", "--epochs", "1", "--batch-size", "32", "--seeds", "0", "1", "--spaces",
                       "0.5", "--self-space", "0.5", "--hessian-samples", "16", "--hessian-probes", "2",
                       "--out", str(out), "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    settings = {r["setting"] for r in results["runs"]}
    assert settings == {"base", "online s=0", "online s=0.5", "self s=0", "self s=0.5"}
    assert len(results["runs"]) == 10 and all(r["hessian_trace"] == r["hessian_trace"] for r in results["runs"])
    report = (out / "results.md").read_text()
    assert "| online s=0.5 |" in report and "Hessian trace" in report and "student accuracy" in report
    assert (out / "accuracy_vs_space.png").read_bytes()[:4] == b"\x89PNG"


def test_dry_run_lists_the_configs(capsys):
    assert repro.main(["--dry-run", "--seeds", "0", "--spaces", "1.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[2].startswith("online s=1.5 0")
