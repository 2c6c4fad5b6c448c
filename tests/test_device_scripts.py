"""scripts/device/gpu_check.sh's staging, run for real on a stand-in repository: a GPU session has
15 minutes, so a shell mistake there costs what no CPU session can give back. The core tree
unpacks with the first call; DALI's waits for all of its parts; a stage that needs DALI says so
before it has arrived, instead of failing inside Python."""

from __future__ import annotations

import io
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("xz") is None,
                                reason="needs bash and xz")


def _tree_xz(files: dict[str, str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(raw.getvalue())


def _carry(repo: Path, folder: str, files: dict[str, bytes]) -> None:
    """What a device call's `carry` does: this call's folder under .whl/, the previous one gone."""
    shutil.rmtree(repo / ".whl", ignore_errors=True)
    (repo / ".whl" / folder).mkdir(parents=True)
    for name, data in files.items():
        (repo / ".whl" / folder / name).write_bytes(data)


def _check(repo: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CARL_DEVICE_TMP": str(tmp), "OUT": str(tmp / "out")}
    return subprocess.run(["bash", "scripts/device/gpu_check.sh", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_check_unpacks_the_core_tree_at_once_and_dali_once_all_its_parts_are_staged(tmp_path):
    repo, tmp = tmp_path / "repo", tmp_path / "device_tmp"
    (repo / "scripts/device").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/device/gpu_check.sh", repo / "scripts/device/")

    nothing = _check(repo, tmp, "data")
    assert nothing.returncode == 1 and "the core tree is not staged: carry .whl/c1" in nothing.stdout

    dali = _tree_xz({"dali_marker.py": "Y = 2\n" * 3000})
    cut = [0, len(dali) // 3, 2 * len(dali) // 3, len(dali)]
    part = [dali[a:b] for a, b in zip(cut, cut[1:])]
    # as prepare.sh packs them: the core tree and DALI's first part with the first call
    _carry(repo, "c1", {"core.tar.xz": _tree_xz({"core_marker.py": "X = 1\n"}), "dali.tar.xz.part00-of-03": part[0]})
    first = _check(repo, tmp, "data")  # data needs DALI, which has not all come yet
    assert first.returncode == 1, first.stdout + first.stderr
    assert "!!! data needs DALI (DALI: 1 of 3 parts staged)" in first.stdout
    assert (tmp / "site_core/core_marker.py").read_text() == "X = 1\n" and (tmp / "site_core/.complete").exists()

    _carry(repo, "c2", {"dali.tar.xz.part01-of-03": part[1]})
    staged = _check(repo, tmp, "--stage")
    assert staged.returncode == 0 and "dali.tar.xz.part01-of-03" in staged.stdout
    assert not (tmp / "site_dali").exists()

    _carry(repo, "c3", {"dali.tar.xz.part02-of-03": part[2]})
    typo = _check(repo, tmp, "e2e_jpg")  # a name that is no stage: refused before anything runs
    assert typo.returncode == 2 and "gpu_check.sh: no stage named e2e_jpg (stages: shards" in typo.stdout
    assert not (tmp / "site_core").exists() or not (tmp / "site_dali").exists()
    last = _check(repo, tmp, "--unpack-only")  # no stage runs
    assert last.returncode == 0, last.stdout + last.stderr
    assert "DALI: 3 of 3 parts staged" in last.stdout
    assert (tmp / "site_dali/dali_marker.py").read_text() == "Y = 2\n" * 3000
    assert not list(tmp.glob("*.partial")) and not list(tmp.glob("*.tar.xz"))


def _stages() -> dict[str, tuple[int, list[str]]]:
    """gpu_check.sh's stages: name -> (time limit in s, command), continuation lines joined."""
    text = (ROOT / "scripts/device/gpu_check.sh").read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        words = words[1:] if words and words[0].startswith("TAIL=") else words
        if len(words) > 3 and words[0] == "stage":
            out[words[1]] = (int(words[2]), words[3:])
    return out


class _Parsed(Exception):
    pass


def test_every_gpu_check_stage_names_arguments_its_benchmark_accepts(monkeypatch):
    """Each stage's command line through its benchmark's own argument checks (stopped before any
    work): a typo there would cost a GPU session the stage. The calls the docs prescribe name
    stages that exist and fit one call's 10 minutes."""
    import importlib

    from carl_scale.bench import data
    from carl_scale.datasets import synthetic

    stages = _stages()
    assert {"step_T80", "step_T240", "gpu_tests", "gpu_tests_dali", "data", "e2e_jpeg"} <= set(stages)
    written, read = set(), {}  # the shard directories the data stages write, and those the e2e stages read
    monkeypatch.setattr(synthetic, "ensure_synthetic_shards", lambda out, *a, **kw: written.add(str(out)))
    real_ensure = data.ensure_bench_shards
    for name, (limit, cmd) in stages.items():
        assert cmd[:2] == ["python3", "-m"], name
        if cmd[2] == "pytest":
            assert cmd[cmd.index("-m", 3) + 1] in ("gpu and not dali", "gpu and dali"), name
            continue
        mod = importlib.import_module(cmd[2])
        first_work = "ensure_bench_shards" if cmd[2].endswith(".data") else "run"

        def stop(*args, **kwargs):
            if first_work == "ensure_bench_shards":
                real_ensure(*args, **kwargs)  # (the directories it would write, recorded above)
            raise _Parsed

        monkeypatch.setattr(mod, first_work, stop)
        with pytest.raises(_Parsed):  # (argparse's errors are SystemExit: they fail the test)
            mod.main(cmd[3:])
        if "--shards" in cmd:
            read[name] = cmd[cmd.index("--shards") + 1]
    # every e2e stage reads shards a data stage of the script writes (the default ones' names follow
    # their settings: the texture, the shortest video), not a directory no stage makes
    assert read and all(path in written for path in read.values()), (read, written)

    script = (ROOT / "scripts/device/gpu_check.sh").read_text()
    needs_dali = re.search(r'needs_dali="([^"]*)"', script).group(1).split()
    assert set(needs_dali) <= set(stages) and "step_T80" not in needs_dali and "gpu_tests" not in needs_dali
    listed = re.search(r'^stages="([^"]*)"', script, flags=re.M).group(1).replace("\\\n", " ").split()
    assert listed == list(stages)  # the names a call may give are exactly the stages, in order
    # the calls BENCHMARKS.md shows and the next lease's plan in the script's header
    documented = re.findall(r"^bash scripts/device/gpu_check.sh ([A-Za-z_0-9 ]+?)\s*(?:#|$)",
                            (ROOT / "BENCHMARKS.md").read_text(), flags=re.M)
    plan = re.findall(r"^#\s+bash scripts/device/gpu_check.sh ([A-Za-z_0-9 ]+?)\s*(?:\(|$)", script, flags=re.M)
    assert len(documented) >= 3 and len(plan) >= 4
    for call in documented + plan:
        assert set(call.split()) <= set(stages), call
        assert sum(stages[s][0] for s in call.split()) <= 540, call  # + unpacking, within 600 s
    order = list(stages)
    for call in plan:  # stages run in the file's order: the plan's order is what runs
        assert call.split() == sorted(call.split(), key=order.index), call


def test_each_device_call_fits_its_64_mib_beside_the_repository():
    """A call carries its .whl part and the whole working tree (tracked and untracked files git does
    not ignore) within 64 MiB: prepare.sh's parts leave room for the repository, with 1 MiB to spare.
    The parts exist only where prepare.sh ran; CI checks the repository against prepare.sh's size."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    tree = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    mib = 1 << 20
    text = (ROOT / "scripts/device/prepare.sh").read_text()
    part = int(re.search(r"split -b (\d+)M", text).group(1)) * mib
    assert part + tree <= 63 * mib, f"the repository ({tree / mib:.2f} MiB) leaves too little room beside a part"
    for call in sorted((ROOT / ".whl").glob("c*")):
        size = sum(f.stat().st_size for f in call.iterdir())
        assert size + tree <= 63 * mib, f"{call.name}: {size / mib:.2f} MiB + the repository {tree / mib:.2f} MiB"


def test_the_gpu_tests_split_into_those_that_need_dali_and_those_that_do_not():
    """gpu_check.sh runs "gpu and not dali" with its first call (no DALI there yet) and "gpu and
    dali" once DALI is staged: together every test of the GPU suite (all marked gpu), neither empty."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu and dali",
                        "tests/test_gpu.py", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    dali, total = map(int, re.search(r"(\d+)/(\d+) tests collected", r.stdout).groups())
    assert dali >= 3 and total - dali >= 5, r.stdout
