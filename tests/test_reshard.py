"""`llama-cli reshard` and checkpoints stored in other split layouts."""

import os

import torch

from helpers import TINY, greedy, make_model_folder, reader_for, run_torchrun
from llama_cli.cli import cli


def test_reshard_round_trip(tmp_path, spm_path, tiny_ckpt, capsys):
    folder, weights = make_model_folder(tmp_path / "src", spm_path, TINY, n_shards=2)
    assert cli(["reshard", "--ckpt_dir", str(folder), "--out", str(tmp_path / "one"), "--shards", "1"]) == 0
    assert cli(["reshard", "--ckpt_dir", str(tmp_path / "one"), "--out", str(tmp_path / "two"), "--shards", "2",
                "--dtype", "bf16"]) == 0
    one = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    assert set(one) == set(weights)
    assert all(torch.equal(one[k], weights[k]) for k in weights)
    two = [torch.load(tmp_path / "two" / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    assert two[0]["layers.0.feed_forward.w2.weight"].dtype == torch.bfloat16
    assert two[0]["layers.0.feed_forward.w2.weight"].shape[1] * 2 == weights["layers.0.feed_forward.w2.weight"].shape[1]
    assert (tmp_path / "two" / "tokenizer.model").exists()
    assert greedy(tmp_path / "one") == greedy(tiny_ckpt[0])


def test_reshard_refusals(tmp_path, tiny_ckpt, capsys):
    folder = tiny_ckpt[0]
    assert cli(["reshard", "--ckpt_dir", str(folder), "--out", str(tmp_path / "x"), "--shards", "3"]) == 2
    err = capsys.readouterr().err
    assert "cannot be split into 3 shards (n_heads=4, n_kv_heads=2, dim=64, vocab_size=" in err
    assert err.endswith("write one of these shard counts: 1, 2\n")  # 4 would cut a KV head
    assert cli(["reshard", "--ckpt_dir", str(folder), "--out", str(tmp_path / "x"), "--shards", "4"]) == 2
    assert "2 KV heads" in capsys.readouterr().err
    assert cli(["reshard", "--ckpt_dir", str(folder), "--out", str(folder), "--shards", "1"]) == 2
    assert "different folder" in capsys.readouterr().err
    assert cli(["reshard", "--ckpt_dir", str(folder), "--shards", "1"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_vocab_parallel_embeddings_are_read_too(tmp_path, spm_path, tiny_ckpt):
    """Llama 3 checkpoints split tok_embeddings by vocabulary (dim 0), not by embedding (dim 1)."""
    folder, weights = make_model_folder(tmp_path / "l3", spm_path, TINY, n_shards=2)
    for s in range(2):
        path = folder / f"consolidated.0{s}.pth"
        sd = torch.load(path, weights_only=True)
        sd["tok_embeddings.weight"] = weights["tok_embeddings.weight"].chunk(2, dim=0)[s].clone()
        torch.save(sd, path)
    assert greedy(folder) == greedy(tiny_ckpt[0])
    reader = reader_for(folder, weights["tok_embeddings.weight"].shape[0])
    parts = [reader.rank_state_dict(2, r, torch.float32) for r in range(2)]
    assert torch.equal(torch.cat([p["tok_embeddings.weight"] for p in parts], 1), weights["tok_embeddings.weight"])


def test_one_process_per_shard_uses_the_memory_map_in_place(tiny_ckpt2):
    folder, weights = tiny_ckpt2
    reader = reader_for(folder, weights["tok_embeddings.weight"].shape[0])
    sd = reader.rank_state_dict(2, 1, torch.float32)
    # a file mapping (not resizable), not a fresh copy (resizable)
    assert not sd["layers.0.attention.wq.weight"].untyped_storage().resizable()
    assert torch.equal(sd["layers.0.attention.wq.weight"], weights["layers.0.attention.wq.weight"][32:])
    merged = reader.rank_state_dict(1, 0, torch.float32)
    assert merged["layers.0.attention.wq.weight"].untyped_storage().resizable()


def test_reshard_then_torchrun(tmp_path, tiny_ckpt, capsys):
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(tmp_path / "r2"), "--shards", "2"]) == 0
    assert run_torchrun(2, tmp_path / "r2", tmp_path / "out")["greedy"] == greedy(tiny_ckpt[0])


def _tensor_bytes(path):
    sd = torch.load(path, weights_only=True, mmap=True)
    return sum(t.numel() * t.element_size() for t in sd.values()), sd


def test_reshard_files_hold_only_their_tensors_and_tied_stays_tied(tmp_path, spm_path):
    """Each written shard is about the size of the tensors it holds (narrowed views would save their whole
    storage), and a checkpoint without output.weight (tied) gets none added."""
    folder, weights = make_model_folder(tmp_path / "src", spm_path, TINY, n_shards=1)
    sd = torch.load(folder / "consolidated.00.pth", weights_only=True)
    del sd["output.weight"]
    torch.save(sd, folder / "consolidated.00.pth")
    assert cli(["reshard", "--ckpt_dir", str(folder), "--out", str(tmp_path / "two"), "--shards", "2"]) == 0
    assert cli(["reshard", "--ckpt_dir", str(tmp_path / "two"), "--out", str(tmp_path / "one"), "--shards", "1"]) == 0
    for path in [tmp_path / "two" / "consolidated.00.pth", tmp_path / "two" / "consolidated.01.pth",
                 tmp_path / "one" / "consolidated.00.pth"]:
        held, shard = _tensor_bytes(path)
        assert "output.weight" not in shard  # still tied
        assert path.stat().st_size < held * 1.05 + 64 * 1024, (path, path.stat().st_size, held)
    _, one = _tensor_bytes(tmp_path / "one" / "consolidated.00.pth")
    assert all(torch.equal(one[k], sd[k]) for k in sd)
    assert (tmp_path / "one" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    assert greedy(tmp_path / "one") == greedy(folder)


def test_reshard_into_a_folder_holding_a_checkpoint_is_refused(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "o"
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "1"]) == 0
    capsys.readouterr()
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "1"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    (out / "params.json").unlink()  # as a writer killed while saving its shards leaves it
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{out} holds consolidated.00.pth without params.json: a write "
                                                    "into it that did not finish? remove them, or choose an empty "
                                                    "or new folder")


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """Found with a small tmpfs: converting onto a full disk died of a bus error (the staging files are mapped,
    and a write through the map had no block to go to). The staging files now get their blocks first; a disk too
    full for them, or for the shards after them, is one line, exit 1, and the output folder is left as it was.
    The full disk is simulated here (the calls that meet it), as CI cannot mount a small one."""
    import errno
    import os
    import shutil

    import llama_cli.convert.writer as writer

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "new"
    monkeypatch.setattr(writer.os, "posix_fallocate", no_space, raising=False)
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"llama-cli: error: cannot write into {out}: No space left on device (0 MB staged")
    assert err[-1].endswith("choose another --out; nothing was left behind") and len(err) == 1
    assert not out.exists()  # made by the run, removed again
    monkeypatch.undo()

    # room for the staged tensors, none for the shards: refused before writing one (an existing folder stays)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage._replace(free=2**19))
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "2"]) == 1
    assert "not enough space for the shards" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    # the disk filling up while the second shard is saved: the first is removed again
    monkeypatch.undo()
    save = torch.save
    calls = []

    def save_then_fill(obj, path):
        calls.append(path)
        if len(calls) == 2:
            monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage._replace(free=0))
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")
        save(obj, path)

    monkeypatch.setattr(writer.torch, "save", save_then_fill)
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "2"]) == 1
    assert "the disk filled up" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and len(calls) == 2


HOLD_A_WRITER = """
import sys, time, torch
from llama_cli.checkpoint import load_args
from llama_cli.convert.writer import CheckpointWriter
w = CheckpointWriter(sys.argv[2], 1, torch.float32, load_args(sys.argv[1] + "/params.json"))
w.add("norm.weight", torch.ones(1 << 20))
print("staged", flush=True)
time.sleep(600)
"""


def test_a_writer_killed_outright_leaves_nothing_in_the_way(tmp_path, tiny_ckpt, capsys):
    """Found by hand: a convert killed outright (kill -9, the OOM killer) left its staging folder (.convert-*,
    up to the checkpoint's size, hidden) for ever, and two writers into one folder would each save its shards
    over the other's. A writer holds a lock on its staging folder: a second is refused while the first writes,
    and the next writer after a killed one removes what it left."""
    import os
    import subprocess
    import sys

    from helpers import subprocess_env

    out = tmp_path / "out"
    args = ["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "2"]
    child = subprocess.Popen([sys.executable, "-c", HOLD_A_WRITER, str(tiny_ckpt[0]), str(out)],
                             stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert child.stdout.readline().strip() == "staged"
        [left] = out.glob(".convert-*")
        assert cli(args) == 2
        assert capsys.readouterr().err.strip() == (f"llama-cli: error: {out} is being written by another llama-cli "
                                                   "run now; wait for it to end, or choose another --out")
        assert list(out.glob(".convert-*")) == [left]  # the refused run left nothing either
    finally:
        child.kill()  # SIGKILL: no cleanup of its own
        child.wait()
    os.utime(left, (left.stat().st_atime - 60, left.stat().st_mtime - 60))  # not a writer that just began
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert f"removed {left.name} (4 MB), left in {out} by a run that was killed while writing there" in err
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json",
                                                     "tokenizer.model"]


def test_params_json_is_written_last_after_the_tokenizer(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """A folder that has params.json is complete: the tokenizer's files are written before it (a run killed
    between the two used to leave a folder that looked done and had no tokenizer). Where the tokenizer's write
    fails, the shards go too, and a tokenizer file that was in --out before is left alone."""
    import llama_cli.convert.writer as writer  # (reshard imports copy_tokenizer_files from it when it runs)

    seen = []
    real = writer.copy_tokenizer_files

    def watch(src, out):
        seen.append(sorted(os.listdir(out)))
        return real(src, out)

    monkeypatch.setattr(writer, "copy_tokenizer_files", watch)
    out = tmp_path / "a"
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "2"]) == 0
    assert len(seen) == 1 and "params.json" not in seen[0] and "consolidated.01.pth" in seen[0]
    assert {"params.json", "tokenizer.model"} <= set(os.listdir(out))

    def killed(src, out):
        real(src, out)
        raise KeyboardInterrupt  # as a kill midway would stop it (Ctrl-C is what can be simulated)

    monkeypatch.setattr(writer, "copy_tokenizer_files", killed)
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "1"]) == 130
    assert sorted(os.listdir(out)) == ["notes.txt"]
    (out / "tokenizer.model").write_bytes(b"the user's own")
    assert cli(["reshard", "--ckpt_dir", str(tiny_ckpt[0]), "--out", str(out), "--shards", "1"]) == 130
    assert sorted(os.listdir(out)) == ["notes.txt", "tokenizer.model"]  # overwritten by the copy, not removed
