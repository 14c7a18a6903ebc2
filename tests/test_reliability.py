"""Failures end the run promptly and clearly, data links cannot mislabel, and no run or tool
writes over what it does not own. Every subprocess here has a timeout, so that a regression to
a hang fails the test instead of stalling the suite."""
import http.server
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from cmal.tools import check_data
from cmal import checkpoint as ckpt_io
from cmal.files import LOCK_NAME, OutputDirError, RunLock
from cmal.tools import plot_curves
from cmal.tools import predict
from cmal import settings
from cmal import train
from cmal.folders import Layout, check_layout
from cmal.tresnet import WeightsError
from cmal.tresnet.weights import cache_name, download
from tests.conftest import TINY_ARGS, make_image_folder
from tests.test_interruptions import launch

ROOT = Path(__file__).resolve().parents[1]
QUICK = 60  # seconds: every failure below must end the process well within this


def _empty_one(root, split="train"):
    bad = root / split / "class_1" / "0.jpg"
    bad.write_bytes(b"")
    return bad


def _train(data, out, *extra):
    return train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out)},
                      TINY_ARGS + list(extra))


# --- failures end the process, loader workers included ----------------------------------------

@pytest.mark.parametrize("check", ["none", "headers"])
def test_bad_image_with_workers_exits_within_seconds(tmp_path, check):
    data = make_image_folder(tmp_path / "data")
    bad = _empty_one(data)
    started = time.time()
    proc = launch(data, tmp_path / "out", "none", 0, "--workers=2", f"--check_images={check}",
                  wait=False)
    _, stderr = proc.communicate(timeout=QUICK)
    assert proc.returncode == 2, stderr
    assert f"error: {bad}: not a readable image" in stderr
    assert "Traceback" not in stderr
    assert time.time() - started < QUICK


def test_two_ctrl_c_with_workers_stop_at_once(tmp_path):
    data = make_image_folder(tmp_path / "data")
    proc = launch(data, tmp_path / "out", "doubleint", 2, "--workers=2", "--epochs=50",
                  wait=False)
    stdout, stderr = proc.communicate(timeout=QUICK)
    assert proc.returncode == 130, stderr
    assert "stopped at once" in stderr and "Traceback" not in stderr
    # The workers went with it: nothing of the run's process group is left.
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_fifo_is_skipped_not_opened(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    fifo = data / "train" / "class_0" / "stuck.jpg"
    os.mkfifo(fifo)
    layout = Layout(data)
    assert str(fifo) not in [p for p, _ in layout.samples["train"]]
    assert any(p == str(fifo) and "not a regular file" in why for p, why in layout.skipped)
    assert check_data.main([str(data), "--workers=1", "--image_size=32"]) == 0
    assert f"SKIPPED {fifo}: not a regular file" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="1 entries .* skipped"):
        assert _train(data, tmp_path / "out", "--epochs=1") == 0


def test_predict_refuses_a_fifo(tmp_path, trained, capsys):
    fifo = tmp_path / "stuck.jpg"
    os.mkfifo(fifo)
    assert predict.main([str(trained / "last.pt"), str(fifo), "--device=cpu"]) == 2
    assert "not a regular file" in capsys.readouterr().err


# --- directory links --------------------------------------------------------------------------

def test_links_never_mislabel_or_count_twice(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    class_0 = data / "train" / "class_0"
    (class_0 / "loop").symlink_to("..")  # back to train/: all classes again
    (class_0 / "other").symlink_to(data / "train" / "class_1")  # another class's folder
    (class_0 / "self").symlink_to(".")  # a loop inside the class
    inner = class_0 / "sub"
    inner.mkdir()
    (inner / "x.jpg").write_bytes((class_0 / "0.jpg").read_bytes())
    (class_0 / "zz_again").symlink_to("sub")  # a second path to a folder inside the class
    layout = Layout(data)
    train_samples = layout.samples["train"]
    assert len(train_samples) == 25  # 8 per class, and sub/x.jpg once
    labels = {Path(p).relative_to(data / "train").parts[0] for p, t in train_samples if t == 0}
    assert labels == {"class_0"}
    reasons = {Path(p).name: why for p, why in layout.skipped}
    assert "outside its class folder" in reasons["loop"]
    assert "outside its class folder" in reasons["other"]
    assert "already scanned" in reasons["self"] and "already scanned" in reasons["zz_again"]
    assert check_data.main([str(data), "--workers=1", "--image_size=32"]) == 0
    out = capsys.readouterr().out
    assert f"SKIPPED {class_0 / 'loop'}: a link to {data / 'train'}, outside" in out


def test_a_linked_class_folder_is_followed(tmp_path):
    data = make_image_folder(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    (data / "train" / "class_2").rename(elsewhere)
    (data / "train" / "class_2").symlink_to(elsewhere)
    classes, samples = check_layout(data)
    assert len([t for _, t in samples["train"]]) == 24 and classes[2] == "class_2"


def test_a_file_linked_into_two_classes_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "data")
    (data / "train" / "class_0" / "twin.jpg").symlink_to(data / "train" / "class_1" / "0.jpg")
    layout = Layout(data)
    assert any("linked into two class folders" in p for p in layout.problems)


# --- one run per output folder; checks before expensive work ----------------------------------

def test_second_run_into_a_busy_folder_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    first = launch(data, out, "none", 0, "--epochs=500", wait=False)
    try:
        lock = out / LOCK_NAME
        deadline = time.time() + QUICK
        while time.time() < deadline and first.poll() is None and not (
                lock.exists() and lock.read_text()):
            time.sleep(0.05)
        second = launch(data, out, "none", 0, "--overwrite", wait=False)
        _, stderr = second.communicate(timeout=QUICK)
        assert second.returncode == 2
        assert f"in use by another training run (process {first.pid} on" in stderr
    finally:
        first.kill()
        first.communicate(timeout=QUICK)
    # The first run died without releasing anything: its lock is recognised as stale.
    assert launch(data, out, "none", 0, "--epochs=1", "--overwrite").returncode == 0


def test_lock_is_released_and_reacquired_in_one_process(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(OutputDirError, match=f"process {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire().release()


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_bad_output_dir_stops_before_the_data_scan(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "run",
           "unwritable": Path("/proc/cmal-test-run")}[where]
    scanned = []
    monkeypatch.setattr(train, "build_loaders", lambda *a, **k: scanned.append(1))
    # An unreachable weight URL: were it fetched first, the error would name it instead.
    assert _train(tmp_path / "no-data", out, "--weights=http://127.0.0.1:9/w.pth") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--output_dir" in err and str(out) in err
    assert len(err.strip().splitlines()) == 1 and not scanned
    if where == "unwritable":  # /proc/...: no such folder can be made, writable or not
        assert "make it writable" not in err and "choose another --output_dir" in err


def test_negative_settings_are_refused(capsys):
    for bad in ("--lr=-0.1", "--backbone_lr=-1", "--max_image_pixels=-5", "--weight_decay=-1"):
        with pytest.raises(SystemExit) as exc:
            settings.parse({"data_path": "x"}, [bad])
        assert exc.value.code == 2
        assert bad.split("=")[0] in capsys.readouterr().err


def test_overwrite_removes_the_old_runs_files_first(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert _train(data, out, "--epochs=1") == 0
    assert (out / "best.pt").exists()
    # A new run that dies in its first iteration must not leave the old best.pt behind.
    proc = launch(data, out, "step", 1, "--overwrite", "--save_every=0")
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    assert (out / ckpt_io.JSON_LOG).read_text() == ""  # the new run's, still empty


def test_bad_test_image_stops_before_training(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    bad = _empty_one(data, "test")
    started = time.time()
    assert _train(data, tmp_path / "out", "--epochs=3") == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a readable image" in err and "checking the test images" in err
    assert not (tmp_path / "out" / "last.pt").exists()
    assert time.time() - started < QUICK
    with pytest.warns(UserWarning, match="skipping 1 unreadable test images"):
        assert _train(data, tmp_path / "skip", "--epochs=1", "--skip_bad_images") == 0
    last = ckpt_io.load(tmp_path / "skip" / "last.pt")["history"][-1]
    assert last["test"]["samples"] == 8


# --- tools never write over their inputs or existing files ------------------------------------

@pytest.fixture
def trained(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert _train(data, out, "--epochs=1") == 0
    return out


def test_predict_csv_never_overwrites_silently(trained, capsys):
    image = str(trained.parent / "data" / "test" / "class_0" / "0.jpg")
    checkpoint = trained / "last.pt"
    before = checkpoint.read_bytes()
    for target, flags in ((checkpoint, []), (checkpoint, ["--overwrite"]), (image, ["--overwrite"])):
        assert predict.main([str(checkpoint), image, f"--csv={target}", "--device=cpu",
                             *flags]) == 2
        assert "one of this command's inputs" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    existing = trained / "mine.csv"
    existing.write_text("keep me")
    assert predict.main([str(checkpoint), image, f"--csv={existing}", "--device=cpu"]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert predict.main([str(checkpoint), image, f"--csv={existing}", "--device=cpu",
                         "--overwrite"]) == 0
    assert existing.read_text().startswith("path,rank,class,score")


def test_plot_curves_never_overwrites_silently(trained, capsys):
    log = trained / ckpt_io.JSON_LOG
    assert plot_curves.main([str(trained), f"--out={log}", "--overwrite"]) == 2
    assert "one of this command's inputs" in capsys.readouterr().err
    png = trained / "curves.png"
    png.write_text("keep me")
    assert plot_curves.main([str(trained), f"--out={png}"]) == 2
    assert png.read_text() == "keep me"
    assert plot_curves.main([str(trained), f"--out={png}", "--overwrite"]) == 0


def test_attention_never_writes_over_an_input_image(tmp_path, trained, capsys):
    from cmal.tools import attention
    from PIL import Image
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "a.png")
    # Its picture would be pictures/a.png: the input itself.
    args = [str(trained / "last.pt"), str(folder / "a.png"), f"--out={folder}", "--device=cpu"]
    assert attention.main(args + ["--overwrite"]) == 2
    assert "one of this command's inputs" in capsys.readouterr().err


# --- downloads --------------------------------------------------------------------------------

class _Trickle(http.server.BaseHTTPRequestHandler):
    """Sends a large Content-Length, then one byte every 0.2 s."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        try:
            for _ in range(200):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_download_has_a_deadline_for_the_whole_transfer(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/tresnet.pth"
    started = time.time()
    try:
        with pytest.raises(WeightsError, match=r"past the download deadline of 2 s"):
            download(url, dest_dir=tmp_path, timeout=5.0, progress=False, deadline=2.0)
    finally:
        httpd.shutdown()
    assert time.time() - started < 10
    assert list(tmp_path.iterdir()) == []  # no cache entry, no partial file


def test_cache_key_tells_urls_with_the_same_file_name_apart():
    a = cache_name("https://one.example/models/tresnet.pth")
    b = cache_name("https://two.example/other/tresnet.pth")
    assert a != b and a.endswith("-tresnet.pth") and b.endswith("-tresnet.pth")


# --- messages ---------------------------------------------------------------------------------

def test_random_bytes_are_not_called_code(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    junk = tmp_path / "junk.pt"
    # Seeded bytes: os.urandom begins a pickle's 0x80 once in 256 runs, and such a file is then
    # (rightly) a pickle that is truncated or corrupt, which is another message.
    junk.write_bytes(b"\x00" + random.Random(0).randbytes(4095))
    assert _train(data, tmp_path / "out", f"--resume={junk}") == 2
    err = capsys.readouterr().err
    assert "is not a PyTorch file" in err and "arbitrary code" not in err
    # --resume takes a training checkpoint, not any file torch.save wrote.
    assert "pass the last.pt or best.pt that a training run wrote" in err


def test_run_files_follow_the_umask(tmp_path):
    data = make_image_folder(tmp_path / "data")
    before = os.umask(0o022)
    try:
        assert _train(data, tmp_path / "out", "--epochs=1") == 0
    finally:
        os.umask(before)
    for name in ("last.pt", "best.pt", ckpt_io.JSON_LOG, ckpt_io.TRAIN_LOG):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


def test_run_folder_holds_its_settings_and_a_summary(tmp_path):
    import csv
    import json
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert _train(data, out, "--epochs=2", "--eval_every=2") == 0
    saved = json.loads((out / ckpt_io.SETTINGS_FILE).read_text())
    assert saved["image_size"] == 32 and saved["layers"] == [1, 1, 1, 1]
    rows = list(csv.DictReader((out / ckpt_io.SUMMARY).open()))
    records = [json.loads(line) for line in (out / ckpt_io.JSON_LOG).read_text().splitlines()]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[0]["eval_acc_combined"] == ""  # epoch 1 was not evaluated
    assert float(rows[1]["eval_acc_combined"]) == pytest.approx(
        records[1]["test"]["acc_combined"], abs=1e-6)
    assert float(rows[1]["train_loss"]) == pytest.approx(records[1]["train_loss"], abs=1e-6)


# --- full disks, read-only folders, and messages that name the right thing (#18) ---------------

def _one_line(err):
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path, capsys,
                                                                         monkeypatch):
    import errno
    import torch
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    real_save, saved = torch.save, []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if saved:  # the second checkpoint meets a full disk partway through
            f.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(obj["epoch"])
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    assert _train(data, out, "--epochs=2", "--eval_every=1") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"no space left on the device holding {out}" in err
    assert f"while writing {out}" in err and "the previous last.pt is intact" in err
    assert "free space, then continue the run with --resume" in err
    monkeypatch.undo()
    assert ckpt_io.load(out / "last.pt")["epoch"] == saved[0] == 1
    assert not list(out.glob(".*.tmp"))


def test_a_full_disk_in_torch_save_is_named_not_a_traceback(tmp_path, monkeypatch):
    """The kernel's own ENOSPC (/dev/full), which torch.save reports as a RuntimeError without
    an errno."""
    import errno
    import torch
    from cmal.errors import DiskFullError, WriteError
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    target = tmp_path / "last.pt"
    ckpt_io.save({"epoch": 1}, target)
    before = target.read_bytes()
    real_fdopen = os.fdopen

    def full_disk(fd, *args, **kwargs):
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", full_disk)
    with pytest.raises(WriteError) as exc:
        ckpt_io.save({"epoch": 2, "weights": torch.zeros(1 << 16)}, target)
    monkeypatch.undo()
    message = str(exc.value)
    assert isinstance(exc.value, DiskFullError) and exc.value.__cause__ is None
    assert message.startswith(f"no space left on the device holding {tmp_path}")
    assert f"while writing {target}; the previous last.pt is intact" in message
    assert target.read_bytes() == before and sorted(tmp_path.iterdir()) == [target]
    # The quota spent is said as such.
    monkeypatch.setattr(torch, "save", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))))
    with pytest.raises(DiskFullError, match="the disk quota is exhausted"):
        ckpt_io.save({}, target)


def test_a_full_disk_anywhere_ends_in_one_line(capsys):
    import errno
    from cmal.errors import run_command

    def body(filename):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    for filename, said in (("/tmp/x/curves.png", "while writing /tmp/x/curves.png"),
                           (None, "a file the system did not name")):
        assert run_command(body, filename) == 2
        err = _one_line(capsys.readouterr().err)
        assert "no space left" in err and said in err and "free space" in err
    with pytest.raises(OSError):  # any other failure stays a bug's traceback
        run_command(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))


def test_test_only_in_a_read_only_folder_keeps_the_accuracies(run_dir, tmp_path, capsys,
                                                              monkeypatch):
    import errno
    data = run_dir.parent / "data"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # as root, chmod would not stop the writes
        if run_dir in (self, *self.parents):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert _train(data, run_dir, "--test_only") == 2
    captured = capsys.readouterr()
    assert "test concat" in captured.out and "top-5" in captured.out
    err = _one_line(captured.err)
    assert ("the accuracies above stand, but the evaluation report could not be written into "
            f"{run_dir / 'best_evaluation'} (cannot write (Read-only file system))") in err
    assert "link or copy" in err and "--test_only --resume=FOLDER/best.pt" in err
    monkeypatch.undo()
    assert not (run_dir / "best_evaluation").exists()
    # The advice works: a link in a folder one can write to.
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "best.pt").symlink_to(run_dir / "best.pt")
    assert _train(data, tmp_path / "elsewhere", "--test_only",
                  f"--resume={tmp_path / 'eval' / 'best.pt'}") == 0
    assert (tmp_path / "eval" / "best_evaluation" / "per_class.csv").exists()


def test_resume_names_a_folder_and_test_only_its_default(run_dir, tmp_path, capsys):
    data = run_dir.parent / "data"
    assert _train(data, tmp_path / "new", f"--resume={run_dir}", "--epochs=3") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--resume={run_dir} is a folder; pass a checkpoint file, such as " in err
    assert str(run_dir / "last.pt") in err
    assert f"give --resume no value to continue {tmp_path / 'new' / 'last.pt'}" in err
    assert "does not exist" not in err and "no such file" not in err
    assert _train(data, tmp_path / "empty", "--test_only") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"checkpoint {tmp_path / 'empty' / 'best.pt'} does not exist" in err
    assert "--test_only evaluates --output_dir's best.pt" in err


def test_a_pickle_that_would_run_code_is_called_so_at_every_protocol(tmp_path, capsys):
    import pickle
    import torch
    data = make_image_folder(tmp_path / "data")
    for protocol in (2, 4, 5):  # pickle.dump writes 4 or 5; the safe loader stops before GLOBAL
        evil = tmp_path / f"evil{protocol}.pt"
        evil.write_bytes(pickle.dumps({"format": ckpt_io.FORMAT,
                                       "payload": _RunsCode(tmp_path / "pwned")},
                                      protocol=protocol))
        assert _train(data, tmp_path / "out", f"--resume={evil}") == 2
        err = _one_line(capsys.readouterr().err)
        assert "could run arbitrary code" in err and "posix.system" in err, protocol
        assert "truncated" not in err
    assert not (tmp_path / "pwned").exists()
    # A whole pickle of plain tensors at a protocol torch's safe loader does not read is said as
    # such, and a truncated file is still truncated.
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain, pickle_protocol=4)
    assert _train(data, tmp_path / "out", f"--resume={plain}") == 2
    err = _one_line(capsys.readouterr().err)
    assert "safe loader cannot read" in err and "default protocol" in err
    assert "truncated" not in err and "arbitrary code" not in err
    cut = tmp_path / "cut.pt"
    cut.write_bytes(pickle.dumps({"payload": list(range(100))}, protocol=4)[:40])
    assert _train(data, tmp_path / "out", f"--resume={cut}") == 2
    assert "truncated or corrupt" in _one_line(capsys.readouterr().err)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
