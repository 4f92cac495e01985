"""Every benchmark figure in the README comes from a recorded run: bench/results/*.json, each saying what machine,
ComfyUI version, pack commit and command measured it, and the README's table is exactly what bench/report.py writes
from them."""
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RECORDS = sorted((REPO_ROOT / "bench" / "results").glob("*.json"))


def test_each_record_says_where_and_how_it_was_measured():
    assert RECORDS, "no benchmark results recorded"
    for path in RECORDS:
        record = json.loads(path.read_text())
        machine = record["machine"]
        assert all(machine[key] and machine[key] != "unknown" for key in ("device", "cpu", "comfyui", "pack_commit")), path
        assert record["command"].startswith(f"python bench/{record['benchmark'].split('-')[0]}.py"), path
        assert record["rows"] and all(row["what"] and row["result"] for row in record["rows"]), path
        assert record["figures"], path


def test_the_readmes_table_is_written_from_the_records():
    check = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    readme = (REPO_ROOT / "README.md").read_text()
    for path in RECORDS:
        for row in json.loads(path.read_text())["rows"]:
            assert f"| {row['what']} | {row['result']} |" in readme
