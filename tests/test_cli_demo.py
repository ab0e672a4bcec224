"""``fastgrad demo`` never overwrites an earlier run: a non-empty ``--out`` is refused, the default is a fresh folder."""

from __future__ import annotations

import os

from fastgrad.cli import main

ARGS = ["--steps", "2", "--no-progress", "--no-report"]
RUNS = {"vanishing-plain", "vanishing-fastgrad", "exploding-plain", "exploding-fastgrad"}


def test_demo_refuses_a_non_empty_out_dir(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "vanishing-plain").mkdir(parents=True)
    earlier = out / "vanishing-plain" / "gradients.jsonl"
    earlier.write_text("an earlier run\n")
    (out / "notes.txt").write_text("mine\n")
    assert main(["demo", "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty" in err and "nothing was written" in err
    assert f"fastgrad demo --out {out}-2" in err and "--force" in err
    assert earlier.read_text() == "an earlier run\n" and sorted(os.listdir(out)) == ["notes.txt", "vanishing-plain"]
    # --force writes the demo's files over the earlier ones and leaves other files alone
    assert main(["demo", "--out", str(out), "--force", *ARGS]) == 0
    assert set(os.listdir(out)) == RUNS | {"notes.txt"} and (out / "notes.txt").read_text() == "mine\n"
    assert earlier.read_text().startswith('{"type":"meta"')


def test_demo_refuses_an_out_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "demo"
    f.write_text("x")
    assert main(["demo", "--out", str(f), *ARGS]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "x"


def test_demo_without_out_writes_a_fresh_folder_each_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", *ARGS]) == 0
    assert main(["demo", *ARGS]) == 0
    folders = sorted(os.listdir(tmp_path / "fastgrad_demo"))
    assert len(folders) == 2
    text = capsys.readouterr().out
    for name in folders:
        assert set(os.listdir(tmp_path / "fastgrad_demo" / name)) == RUNS
        assert os.path.join("fastgrad_demo", name) in text
