"""PVA's encoder training on several processes (pva_command.py train-encoder under torchrun, gloo on the CPU) against the real
host, on the tiny SD1.5-inpainting checkpoint: 2 processes end where 1 ends on the same samples (stage 1 and 2, with
gradient accumulation; the validation loss too); a run resumes at another world size; rank 0 alone writes; a rank that
fails (an exception, an out-of-memory, a killed process) stops every rank with the rank and the cause named, the last
save whole and resumable; bad set-ups are refused before training."""
import csv

import pytest

from sefi_testkit import distributed

RUN = ["--checkpoint", "tiny_inpaint.safetensors", "--recognizer", "r18.safetensors", "--steps", "2",
       "--batch-size", "2", "--accumulation", "2", "--timesteps", "1", "--resolution", "64", "--save-every", "1",
       "--encoder-learning-rate", "1e-3", "--projection-learning-rate", "1e-3", "--recognizer-learning-rate", "1e-3",
       "--log-every", "1", "--validation-every", "1", "--validation-samples", "2"]


@pytest.fixture(scope="module")
def runs(host, pva_files, dataset, tmp_path_factory):
    """launch(name, processes, *extra) -> Launch, with the test host's folders and two held-out people."""
    import shutil
    folder = tmp_path_factory.mktemp("command")
    config = distributed.model_paths_config(host, folder)
    held_out = host.input_dir / "pva_held_out"
    for person in ("astronaut", "cat"):  # held out under other names: the same photos, for speed
        shutil.copytree(dataset / person, held_out / f"held_out_{person}", dirs_exist_ok=True)
    host.checkpoint("tiny_inpaint")

    def launch(name, processes, *extra, **options):
        args = [*RUN, "--dataset", str(dataset), "--validation-dataset", str(held_out), "--name", name, *extra]
        return distributed.launch(host, processes, args, config, **options)
    return launch


@pytest.fixture(scope="module")
def one_process(runs):
    """Stage 1's reference run on one process, which the others must end where it ends: its name."""
    run = runs("one_s1", 1)
    assert run.returncode == 0, run.output[-3000:]
    return "one_s1"


def state(host, name):
    return host.module("sefi_core.train_state").load_train_state(
        str(host.train_state_dir / f"pva_encoder-{name}.safetensors"), "Delete it.")


def loss_log(host, name):
    with open(host.train_state_dir / f"pva_encoder-{name}.csv", newline="") as file:
        return list(csv.DictReader(file))


def assert_same_run(a, b):
    """Two states that differ by the fp32 rounding of the gradients' sum alone. Adam moves a weight by up to its
    learning rate (1e-3 here) a step, whatever the gradient's size, so a weight whose gradient is near zero amplifies
    rounding: every weight within 1% of one step's move. A run on other samples differs by about a whole move."""
    assert a.steps_done == b.steps_done and a.losses == pytest.approx(b.losses, rel=1e-5)
    for name, weight in a.weights.items():
        assert (weight - b.weights[name]).abs().max() <= 0.01 * 1e-3, name


@pytest.mark.parametrize("stage", [1, 2])
def test_two_processes_end_where_one_ends_on_the_same_samples(host, runs, one_process, stage, tmp_path):
    extra = ["--stage", "2", "--encoder", "random.safetensors"] if stage == 2 else []
    if stage == 2:
        one = runs("one_s2", 1, *extra)
        assert one.returncode == 0, one.output[-3000:]
    two = runs(f"two_s{stage}", 2, *extra, writes_log=tmp_path)
    assert two.returncode == 0, two.output[-3000:]
    assert_same_run(state(host, f"one_s{stage}"), state(host, f"two_s{stage}"))
    one_log, two_log = loss_log(host, f"one_s{stage}"), loss_log(host, f"two_s{stage}")
    assert [r["world_size"] for r in one_log + two_log] == ["1", "1", "2", "2"]
    for a, b in zip(one_log, two_log):  # the validation loss too, on the held-out person
        assert float(a["validation_loss"]) == pytest.approx(float(b["validation_loss"]), rel=1e-5)
    load = host.module("sefi_core.pva.model_files").load_encoder
    assert load(str(host.pva_encoder_dir / f"two_s{stage}.safetensors")).settings["world_size"] == 2
    # one writer: rank 0 wrote the encoder, its state and the log; rank 1 nothing in the host's folders
    written = {rank: (tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)}
    assert f"two_s{stage}.safetensors" in written[0] and f"pva_encoder-two_s{stage}.csv" in written[0]
    assert str(host.work_dir) not in written[1]
    if stage == 2:  # the tuned recognizer, written by rank 0 alone too
        assert f"two_s{stage}_recognizer.safetensors" in written[0]


def test_a_run_resumes_at_another_world_size(host, runs, one_process):
    first = runs("resized", 2, "--steps", "1")
    assert first.returncode == 0, first.output[-3000:]
    rest = runs("resized", 1)  # goes on to --steps 2 on one process
    assert rest.returncode == 0, rest.output[-3000:]
    assert_same_run(state(host, "resized"), state(host, one_process))
    assert [r["world_size"] for r in loss_log(host, "resized")] == ["2", "1"]


@pytest.mark.parametrize("kind, cause", [("raise", "rank 1 failed: RuntimeError: injected raise on rank 1"),
                                         ("oom", "rank 1 failed: OutOfMemory: PVA Train Encoder ran out of GPU memory"),
                                         ("kill", "Signal 9 (SIGKILL)")])
def test_a_failing_rank_stops_every_rank_naming_it_and_the_last_save_resumes(host, runs, one_process, kind, cause):
    """Rank 1 fails in step 2's all-reduce (the 3rd: step 1's gradients, its validation, then step 2's): torchrun
    stops rank 0 too, waiting in that collective (or still saving step 1), and names rank 1 and the cause. The last
    save is whole (step 1's, or none where rank 0 was stopped while writing its first) and the run resumes from it."""
    name = f"fault_{kind}"
    failed = runs(name, 2, fault=f"{kind}:1:3", timeout=300)
    assert failed.returncode != 0
    assert cause in failed.output and "rank      : 1" in failed.output, failed.output[-3000:]
    saved = host.train_state_dir / f"pva_encoder-{name}.safetensors"
    assert not saved.exists() or state(host, name).steps_done == 1  # whole: it loads
    if kind == "kill":  # the last save resumes (here on one process) and ends where an unbroken run ends
        rest = runs(name, 1)
        assert rest.returncode == 0, rest.output[-3000:]
        assert_same_run(state(host, name), state(host, one_process))
        assert [r["step"] for r in loss_log(host, name)] == ["1", "2"]


def test_set_ups_that_cannot_train_are_refused_before_training(host, runs, dataset):
    uneven = runs("uneven", 2, "--batch-size", "3", "--accumulation", "1")
    assert uneven.returncode != 0 and "do not split evenly over 2 processes" in uneven.output
    same = runs("same", 1, "--validation-dataset", str(dataset))
    assert same.returncode != 0 and "--validation-dataset is the training dataset" in same.output
    for name in ("uneven", "same"):
        assert not (host.pva_encoder_dir / f"{name}.safetensors").exists()


def test_on_celebahq_idi_the_validation_is_its_val_split(host, runs, tmp_path):
    from sefi_testkit.celebahq_idi import write_celebahq_idi
    written = write_celebahq_idi(tmp_path / "celebahq", size=64)
    config = distributed.model_paths_config(host, tmp_path)
    args = [*RUN, "--dataset", str(written.root), "--name", "idi", "--steps", "1"]
    run = distributed.launch(host, 1, args, config)
    assert run.returncode == 0, run.output[-3000:]
    rows = loss_log(host, "idi")
    assert len(rows) == 1 and rows[0]["validation_loss"] not in ("", None)
    load = host.module("sefi_core.pva.model_files").load_encoder
    assert load(str(host.pva_encoder_dir / "idi.safetensors")).settings["people"] == len(written.identities["train"])


def test_a_run_the_command_started_goes_on_in_the_node(host_clean, runs, one_process):
    from sefi_testkit.pva import encoder_train_graph
    host = host_clean
    result = host.run(encoder_train_graph(one_process, steps=3))  # the same dataset folder, under the input folder
    assert result.success, result.error
    assert any(f"resuming {one_process}.safetensors at step 2 of 3" in text for _, text in host.server.progress_texts())
    assert state(host, one_process).steps_done == 3
