"""PVA's evaluation command (pva_command.py evaluate) against the real host, on a tiny CelebAHQ-IDI in its authors'
layout and the tiny SD1.5-inpainting checkpoint: each test person fine-tuned on their references, each inference photo
repainted in each face region through the host's inpainting, scored; the table it prints is the one the scores in its
CSV make (mean and population std per region, the mean of the region means), recomputed here; a folder of people
(no split) is refused by name."""
import csv
import os
import re
import statistics
import subprocess
import sys

import pytest

from sefi_testkit import distributed
from sefi_testkit.celebahq_idi import write_celebahq_idi

EVALUATE = ["--checkpoint", "tiny_inpaint.safetensors", "--recognizer", "r18.safetensors", "--encoder",
            "random.safetensors", "--fine-tune-steps", "1", "--steps", "1", "--resolution", "64"]


def evaluate(host, config, *args):
    env = {**os.environ, "COMFYUI_PATH": str(host.comfy_path), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(distributed.COMMAND), "evaluate", *EVALUATE, *args,
                           "--extra-model-paths-config", str(config)], env=env, capture_output=True, text=True,
                          timeout=900)


def test_the_evaluation_repaints_each_test_photo_in_each_region_and_reports_the_papers_row(host, pva_files, tmp_path):
    host.checkpoint("tiny_inpaint")
    written = write_celebahq_idi(tmp_path / "celebahq", size=64)
    config = distributed.model_paths_config(host, tmp_path)
    output = tmp_path / "scores.csv"
    done = evaluate(host, config, "--dataset", str(written.root), "--people", "1", "--output", str(output))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    with open(output, newline="") as file:
        rows = list(csv.DictReader(file))
    person = sorted(written.identities["test"])[0]
    assert {r["person"] for r in rows} == {person}
    photos = {f"{i}.jpg" for i in written.inferences(person)}
    regions = ("lowerface", "eyebrow", "wholeface")
    assert sorted((r["photo"], r["region"]) for r in rows) == sorted((p, g) for p in photos for g in regions)
    scores = {g: [float(r["identity_similarity"]) for r in rows if r["region"] == g] for g in regions}
    assert all(-1.0 <= s <= 1.0 for values in scores.values() for s in values)
    for region, values in scores.items():  # the printed table, from the CSV's scores
        line = re.search(rf"{region}: (-?[0-9.]+) ± ([0-9.]+) \((\d+) pictures\)", done.stdout)
        assert line, done.stdout
        assert float(line[1]) == pytest.approx(statistics.fmean(values), abs=6e-4)
        assert float(line[2]) == pytest.approx(statistics.pstdev(values), abs=6e-4)
        assert int(line[3]) == len(values)
    total = re.search(r"mean of region means: (-?[0-9.]+)", done.stdout)
    assert float(total[1]) == pytest.approx(statistics.fmean(statistics.fmean(v) for v in scores.values()), abs=6e-4)


def test_a_folder_of_people_has_no_test_split_and_is_refused(host, pva_files, dataset, tmp_path):
    config = distributed.model_paths_config(host, tmp_path)
    done = evaluate(host, config, "--dataset", str(dataset))
    assert done.returncode != 0 and "is a folder of people" in done.stdout + done.stderr
