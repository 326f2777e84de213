"""What a user gets when something is wrong: each case runs a stage (or run_all.sh, report.py) as a
subprocess on a smoke toy world and asserts a non-zero exit, one `error:` line on stderr with no
traceback, and that what was written before is byte for byte intact. One test per case a demanding
user tried on a fresh clone; the smoke world and one smoke pipeline run are built once per session."""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# third-party deprecation chatter would make stderr more than the one line under test
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
       "PYTHON": sys.executable}  # run_all.sh's stages run with this interpreter
SMALL02 = ["--steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--n_eval", "2", "--max_new_tokens", "8", "--tasks", "toy_math"]
SMALL03 = ["--steps", "2", "--batch_size", "4", "--n_prompts", "4", "--n_eval", "2", "--max_new_tokens", "8", "--tasks", "toy_math"]


def run(*cmd, env=None, **kw):
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=600, **kw)


def stage(script, *args, env=None):
    return run(sys.executable, os.path.join(ROOT, script), *args, env=env)


def one_error_line(r, alone=True):
    """A non-zero exit, no traceback, and stderr ending in exactly one `error: ...` line (alone: nothing else on
    stderr; a stage that fails mid-run may have printed progress lines there first). Returns the line."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), r.stderr[-3000:]
    assert sum(x.startswith("error: ") for x in lines) == 1, r.stderr[-3000:]
    if alone:
        assert len(lines) == 1, r.stderr[-3000:]
    return lines[-1]


def tree(path, skip=()):
    """{relative path: sha256} of every file under path (skip: relative prefixes left out)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), path)
            if not rel.startswith(tuple(skip)):
                with open(os.path.join(root, f), "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A smoke toy world (00_toy_world.py --smoke, seconds): teacher, student, target, data."""
    w = tmp_path_factory.mktemp("bad_inputs") / "world"
    r = stage("00_toy_world.py", "--smoke", "--out_dir", w)
    assert r.returncode == 0, r.stderr[-3000:]
    return w


def models02(w):
    return ["--teacher", w / "teacher", "--target", w / "target", "--data", w / "data"]


def models03(w, method="rkl"):
    return ["--method", method, "--teacher", w / "teacher", "--student", w / "student", "--data", w / "data"]


@pytest.fixture(scope="session")
def finished03(world, tmp_path_factory):
    """A finished 2-step 03 run: earlier outputs that a refused rerun into the same --out_dir must not touch."""
    out = tmp_path_factory.mktemp("finished03") / "rkl"
    r = stage("03_distill.py", *models03(world), "--out_dir", out, *SMALL03)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def finished02(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished02") / "cal"
    r = stage("02_calibrate.py", *models02(world), "--out_dir", out, *SMALL02)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def smoke_run():
    """One whole smoke pipeline (SMOKE=1 bash run_all.sh, ~1.5 min on 2 cores) under runs/_pytest_*, removed after."""
    name = f"_pytest_bad_inputs_{os.getpid()}"
    r = run("bash", "run_all.sh", env={"SMOKE": "1", "RUN": name})
    path = os.path.join(ROOT, "runs", name)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    yield name, path
    shutil.rmtree(path, ignore_errors=True)


def mount_tmpfs(path, size, ro=False):
    """A small tmpfs at path (root only); skips the test where the machine does not allow it."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:100]}); needs root in a machine that allows mounts")


def umount(path):
    subprocess.run(["umount", str(path)], capture_output=True)


# ----------------------------------------------------------------------------- help

@pytest.mark.parametrize("script", ["00_toy_world.py", "01_pilot_kl.py", "02_calibrate.py", "03_distill.py", "04_eval.py",
                                    "05_failure_modes.py", "probe.py", "report.py"])
def test_help_of_every_stage_prints_its_options(script):
    """00's --help died on a bare '%' in a help string (argparse formats them)."""
    r = stage(script, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------- data files (the loaders)

def bad_data(tmp_path, case):
    """A one-file toy_math dataset of 40 good rows and one bad one at line 7 (a single file is split 9:1 by prompt
    hash, so it needs rows on both sides)."""
    rows = [json.dumps({"prompt": f"Ana has {i} pens and gets {i + 1} more. How many?", "answer": str(2 * i + 1)}) for i in range(40)]
    path = tmp_path / "bad.jsonl"
    if case == "malformed":
        rows[6] = "{oops"
    elif case == "no_prompt":
        rows[6] = json.dumps({"text": "no prompt field here", "answer": "1"})
    data = ("\n".join(rows) + "\n").encode()
    if case == "latin1":
        data = data.replace(b"Ana has 6 pens", "Ana hés 6 pens".encode("latin-1"))
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", ["malformed", "latin1", "no_prompt"])
def test_a_bad_data_file_is_one_line_naming_file_and_line(world, tmp_path, case):
    data = bad_data(tmp_path, case)
    before = data.read_bytes()
    r = stage("02_calibrate.py", "--teacher", world / "teacher", "--target", world / "target", "--data", data,
              "--out_dir", tmp_path / "out", *SMALL02, "--tasks", "gsm8k")  # a real task: a toy one refuses a local file
    line = one_error_line(r, alone=False)
    assert f"{data}:7" in line, line
    assert data.read_bytes() == before


# ----------------------------------------------------------------------------- flags checked before any work

@pytest.mark.parametrize("script,flags", [
    ("03_distill.py", ["--steps", "0"]), ("03_distill.py", ["--steps", "-3"]), ("03_distill.py", ["--lr", "nan"]),
    ("03_distill.py", ["--lr", "0"]), ("03_distill.py", ["--batch_size", "0"]), ("03_distill.py", ["--n_prompts", "0"]),
    ("02_calibrate.py", ["--steps", "0"]), ("02_calibrate.py", ["--steps", "-3"]), ("02_calibrate.py", ["--lam", "nan"]),
    ("02_calibrate.py", ["--lr", "inf"]), ("02_calibrate.py", ["--prompts_per_step", "0"]),
    ("02_calibrate.py", ["--beta", "-1"])])
def test_impossible_flags_are_refused_before_anything_is_written(world, finished02, finished03, script, flags):
    """--steps 0 wrote an untrained merged/ or model/ plus summary.json (run_all.sh then took the stage as done);
    --lr nan was a torch traceback; --lam nan surfaced at step 1 blaming lr. Into a finished run's --out_dir:
    refused with one line, every file left as it was."""
    out = finished03 if script == "03_distill.py" else finished02
    args = models03(world) + SMALL03 if script == "03_distill.py" else models02(world) + SMALL02
    before = tree(out)
    line = one_error_line(stage(script, *args, "--out_dir", out, *flags))
    assert f"--{flags[0][2:]} {flags[1]}" in line or flags[0] in line, line
    assert tree(out) == before


def test_impossible_flags_leave_no_out_dir(world, tmp_path):
    r = stage("03_distill.py", *models03(world), "--out_dir", tmp_path / "new", *SMALL03, "--steps", "0")
    one_error_line(r)
    assert not os.path.exists(tmp_path / "new")


# ----------------------------------------------------------------------------- diverged training

def test_diverged_training_keeps_the_last_good_checkpoint_and_names_a_command_that_works(world, tmp_path):
    """03 rkl at --lr 10 on the smoke world: one update ruins the student (loss 0.04 -> ~5, then grad norm 0, then
    NaN). The checkpoint kept must be of weights whose next step was in band (it used to be a diverged one), the
    line names it and a command, and that command (only --lr changed) resumes from it and finishes."""
    out = tmp_path / "div"
    base = [*models03(world), "--out_dir", out, "--batch_size", "4", "--n_prompts", "8", "--n_eval", "4", "--max_new_tokens", "48",
            "--save_every", "2", "--tasks", "toy_math,toy_qa"]
    assert stage("03_distill.py", *base, "--steps", "4", "--lr", "1e-3").returncode == 0
    ck_before = tree(out / "ckpt")
    r = stage("03_distill.py", *base, "--steps", "30", "--lr", "10")
    line = one_error_line(r, alone=False)
    assert "non-finite" in line and "keeps step 4" in line, line
    assert tree(out / "ckpt") == ck_before  # no diverged weights were checkpointed after step 4
    cmd = line.split(": ")[-1]
    assert cmd.startswith("python ") and "03_distill.py" in cmd and cmd.endswith("--lr 1"), cmd
    r2 = run("bash", "-c", cmd.replace("python ", f"{sys.executable} ", 1).replace("--lr 1", "--lr 1e-3"))
    assert r2.returncode == 0 and "resumed from" in r2.stdout and "at step 4" in r2.stdout, r2.stderr[-2000:]
    assert [m["step"] for m in common.read_jsonl(out / "metrics.jsonl")] == list(range(1, 31))


def test_diverged_from_the_start_keeps_nothing_and_says_start_over(world, tmp_path):
    out = tmp_path / "div0"
    r = stage("03_distill.py", *models03(world), "--out_dir", out, "--batch_size", "4", "--n_prompts", "8", "--n_eval", "4",
              "--max_new_tokens", "48", "--save_every", "2", "--steps", "30", "--lr", "10", "--tasks", "toy_math,toy_qa")
    line = one_error_line(r, alone=False)
    assert "no checkpoint passed the divergence check" in line and "--lr 1" in line, line
    assert common.checkpoint_file(str(out / "ckpt")) is None and not os.path.exists(out / "model")


# ----------------------------------------------------------------------------- OS errors: read-only, disk full

@pytest.mark.parametrize("script", ["00_toy_world.py", "01_pilot_kl.py", "02_calibrate.py", "03_distill.py", "04_eval.py",
                                    "05_failure_modes.py", "probe.py"])
def test_a_read_only_out_dir_is_one_line(world, tmp_path, script):
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "1m", ro=True)
    try:
        args = {"00_toy_world.py": ["--smoke"],
                "01_pilot_kl.py": ["--teacher", world / "teacher", "--student", world / "student", "--data", world / "data"],
                "02_calibrate.py": models02(world) + SMALL02,
                "03_distill.py": models03(world) + SMALL03,
                "04_eval.py": ["--models", f"s={world / 'student'}", "--data", world / "data"],
                "05_failure_modes.py": ["--samples", tmp_path, "--base", "s", "--misled", "m"],
                "probe.py": ["--models", f"s={world / 'student'}", "--data", world / "data"]}[script]
        line = one_error_line(stage(script, *args, "--out_dir", ro / "out"))
        assert str(ro / "out") in line and "Read-only file system" in line and "EROFS" in line, line
    finally:
        umount(ro)


def test_disk_full_is_one_line_and_the_previous_checkpoint_stays(world, tmp_path):
    """03 into a tmpfs that holds one checkpoint but not two: torch.save's failure (a RuntimeError from its
    zip writer) becomes the ENOSPC line naming ckpt/; the step-1 checkpoint stays whole (no ckpt.tmp left),
    and a rerun from a copy on a roomier disk ends identical to an uninterrupted run."""
    args = [*models03(world), "--batch_size", "4", "--n_prompts", "8", "--n_eval", "4", "--max_new_tokens", "16", "--save_every", "1",
            "--steps", "4", "--tasks", "toy_math"]
    full = tmp_path / "full"
    assert stage("03_distill.py", *args, "--out_dir", full).returncode == 0
    size = os.path.getsize(common.checkpoint_file(str(full / "ckpt")))
    small = tmp_path / "small"
    mount_tmpfs(small, f"{int(size * 1.5) // 1024}k")
    try:
        out = small / "d"
        line = one_error_line(stage("03_distill.py", *args, "--out_dir", out), alone=False)
        assert f"{out}/ckpt" in line and "No space left on device" in line and "ENOSPC" in line, line
        ck = common.load_checkpoint(str(out / "ckpt"))
        assert ck["meta"]["step"] == 1 and all(torch.isfinite(w).all() for w in ck["weights"].values())
        assert not os.path.exists(out / "ckpt.tmp")
        shutil.copytree(out, tmp_path / "moved")
    finally:
        umount(small)
    r = stage("03_distill.py", *args, "--out_dir", tmp_path / "moved")
    assert r.returncode == 0 and "at step 1" in r.stdout, r.stderr[-2000:]
    digest = lambda d: (hashlib.sha256((d / "model" / "model.safetensors").read_bytes()).hexdigest(),
                        [{k: v for k, v in m.items() if k not in ("seconds", "eta")} for m in common.read_jsonl(d / "metrics.jsonl")])
    assert digest(tmp_path / "moved") == digest(full)


# ----------------------------------------------------------------------------- run_all.sh and report.py

def test_a_second_run_all_into_a_locked_run_says_who_holds_it(tmp_path):
    """Two run_all.sh into one RUN ran every stage twice into the same files (metrics 1,2,1,2). Here another
    process holds the run folder's lock: refused with one line naming it, nothing in the folder changed."""
    name = f"_pytest_lock_{os.getpid()}"
    path = os.path.join(ROOT, "runs", name)
    os.makedirs(path, exist_ok=True)
    try:
        with open(os.path.join(path, "settings"), "w") as f:
            f.write("something a first run wrote\n")
        lock = open(os.path.join(path, ".lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with open(os.path.join(path, ".lock"), "w") as f:
            f.write(f"PID {os.getpid()} since now\n")
        before = tree(path)
        line = one_error_line(run("bash", "run_all.sh", env={"SMOKE": "1", "RUN": name}))
        assert f"PID {os.getpid()}" in line and "in use" in line, line
        assert tree(path) == before
        lock.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("env,want", [({"TEACHER": "/nonexistent/teacher"}, "no such model folder '/nonexistent/teacher'"),
                                      ({"STUDENT": "nosuchorg/nosuchmodel"}, "not in the local Hugging Face cache"),
                                      ({"TASKS": "toy_math,no_such_task"}, "unknown task 'no_such_task'"),
                                      ({"DATA": "/nonexistent.jsonl"}, "DATA=/nonexistent.jsonl"),
                                      ({"PRESET": "custom", "TEACHER": "/x"}, "PRESET=custom needs STUDENT"),
                                      ({"REDO": "no_such_stage"}, "REDO=no_such_stage is not a stage")])
def test_run_all_refuses_a_model_task_or_stage_that_cannot_work_before_any_stage(env, want):
    """Checked before stage 00 starts (one line, exit 2); a refused model or task leaves no run folder behind."""
    name = f"_pytest_refuse_{os.getpid()}"
    try:
        r = run("bash", "run_all.sh", env={"SMOKE": "1", "RUN": name, "HF_HUB_OFFLINE": "1", **env})
        line = one_error_line(r)
        assert want in line, line
        assert "== " not in r.stdout  # no stage ran
        if "REDO" not in env:
            assert not os.path.exists(os.path.join(ROOT, "runs", name))
    finally:
        shutil.rmtree(os.path.join(ROOT, "runs", name), ignore_errors=True)


@pytest.mark.parametrize("preset", ["custom", "toy"])
def test_run_all_takes_models_and_tasks_from_the_environment(preset):
    """PRESET=custom, or any preset, with TEACHER/STUDENT/TARGET/TASKS/EVAL_TASKS/DATA: the resolved models are
    echoed first (then refused here: the folders do not exist)."""
    env = {"PRESET": preset, "TEACHER": "/m/teacher", "STUDENT": "/m/student", "TARGET": "/m/target", "TASKS": "toy_math",
           "EVAL_TASKS": "toy_qa", "DATA": "/d", "RUN": f"_pytest_env_{os.getpid()}"}
    r = run("bash", "run_all.sh", env=env)
    assert r.stdout.splitlines()[0] == ("models: teacher /m/teacher | student /m/student | target /m/target | tasks toy_math | "
                                        "eval tasks toy_qa | data /d"), r.stdout
    one_error_line(r)


def test_report_refuses_a_run_folder_that_does_not_exist():
    name = os.path.join("runs", f"_pytest_nonexistent_{os.getpid()}")
    line = one_error_line(run(sys.executable, "report.py", "--run", name))
    assert name in line
    assert not os.path.exists(os.path.join(ROOT, name))


def test_a_corrupt_finished_stage_is_redone_and_report_names_it(smoke_run):
    """A truncated summary.json of a finished 02 stage: report.py stops with one line naming it (REPORT.md kept);
    run_all.sh does not take the stage as done: it redoes it (resuming from its checkpoint) with a line saying
    why, and every other stage's outputs stay as they were."""
    name, path = smoke_run
    summ = os.path.join(path, "02_calibrate", "distillable", "summary.json")
    with open(summ) as f:
        text = f.read()
    with open(summ, "w") as f:
        f.write(text[:20])
    report = open(os.path.join(path, "REPORT.md")).read()
    line = one_error_line(run(sys.executable, "report.py", "--run", path))
    assert summ in line and "damaged" in line, line
    assert open(os.path.join(path, "REPORT.md")).read() == report
    others = tree(path, skip=("02_calibrate/distillable", "times.tsv", "REPORT.md", ".lock", "wall.json"))
    r = run("bash", "run_all.sh", env={"SMOKE": "1", "RUN": name})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"== 02_calibrate_distillable (redo: {os.path.relpath(summ, ROOT)} does not parse" in r.stdout, r.stdout
    assert json.load(open(summ)) == json.loads(text)
    assert tree(path, skip=("02_calibrate/distillable", "times.tsv", "REPORT.md", ".lock", "wall.json")) == others


def test_a_model_folder_without_weights_is_one_line_naming_the_fix(world, tmp_path):
    """A later stage pointed at a teacher whose weights file was deleted: one line saying so and how to remake it."""
    teacher = tmp_path / "teacher"
    shutil.copytree(world / "teacher", teacher)
    os.remove(teacher / "model.safetensors")
    line = one_error_line(stage("03_distill.py", *models03(world), "--teacher", teacher, "--out_dir", tmp_path / "o", *SMALL03))
    assert str(teacher) in line and "no weights file" in line and "run_all.sh redoes" in line, line


def test_a_deleted_model_file_makes_run_all_redo_stage_00(smoke_run):
    name, path = smoke_run
    w = os.path.join(path, "00_toy_world", "teacher", "model.safetensors")
    os.remove(w)
    others = tree(path, skip=("00_toy_world", "times.tsv", "REPORT.md", ".lock", "wall.json"))
    r = run("bash", "run_all.sh", env={"SMOKE": "1", "RUN": name})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "== 00_toy_world (redo: " in r.stdout and "teacher has no weights file" in r.stdout, r.stdout
    assert os.path.exists(w) and common.load_model(os.path.dirname(w), "cpu") is not None
    assert tree(path, skip=("00_toy_world", "times.tsv", "REPORT.md", ".lock", "wall.json")) == others


def test_redo_one_stage_redoes_the_stages_that_read_its_outputs_and_no_others(smoke_run):
    name, path = smoke_run
    r = run("bash", "run_all.sh", env={"SMOKE": "1", "RUN": name, "REDO": "03_distill_rkl_original"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ran = [x.split()[1] for x in r.stdout.splitlines() if x.startswith("== ") and not x.startswith("== skip")]
    # 04's Table 2 evaluates the rkl student; 05 reads 04's samples; the fork probe reads the rkl student
    assert ran == ["03_distill_rkl_original", "04_eval_table2", "05_failure", "probe"], r.stdout
