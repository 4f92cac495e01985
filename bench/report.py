"""Writes the README's table of benchmark figures from bench/results/*.json (what each benchmark saved, with its
machine and date), so that every figure there comes from a recorded run.

    python bench/report.py           # rewrite the table in README.md
    python bench/report.py --check   # exit 1 if the README's table is not what the results give
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- benchmark table: written by bench/report.py -->", "<!-- end of benchmark table -->"
ORDER = ("bench_apply", "bench_train", "bench_preview", "bench_pva", "gpu_check")


def table() -> str:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    records.sort(key=lambda r: (ORDER.index(r["benchmark"]) if r["benchmark"] in ORDER else len(ORDER), r["benchmark"],
                                r["machine"]["device"]))
    lines = ["| what | result | measured on |", "| --- | --- | --- |"]
    for record in records:
        where = (f"{record['machine']['device']}, {record['machine']['cpu']}; ComfyUI {record['machine']['comfyui']}; "
                 f"{record['date']} (`{record['command']}`)")
        lines += [f"| {row['what']} | {row['result']} | {where} |" for row in record["rows"]]
    return "\n".join(lines)


def with_table(readme: str) -> str:
    if START not in readme or END not in readme:
        sys.exit(f"README.md has no {START} ... {END} block to write the table into")
    before, rest = readme.split(START, 1)
    return f"{before}{START}\n{table()}\n{END}{rest.split(END, 1)[1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the README's table is up to date")
    args = parser.parse_args()
    readme = README.read_text()
    updated = with_table(readme)
    if args.check:
        if updated != readme:
            print("README.md's benchmark table differs from bench/results: run python bench/report.py")
            return 1
        return 0
    README.write_text(updated)
    print(f"README.md: benchmark table written from {len(list(RESULTS.glob('*.json')))} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
