"""`generate` never writes U+FFFD for a completion that --max-new-tokens stopped inside a multi-byte character
(issue 29 item 11): the completion is the decoded tokens cut at the last whole character, and the row says so.

The model's choice of tokens is fixed here (a generator returning given ids; everything else is the real CLI
run): a random tiny model rarely stops inside a character on cue."""

from __future__ import annotations

import json

from helpers import run_cli


def test_a_completion_cut_inside_a_character_ends_before_it(world, tmp_path, monkeypatch):
    import kdpipe.generation.hf

    tok = world.tokenizer
    whole = tok("57 café", add_special_tokens=False)["input_ids"]  # byte-level BPE: é is 2 byte tokens here
    assert tok.decode(whole[:-1]).endswith("\ufffd")
    given = {"arith-train-00000": (whole[:-1], "length"), "arith-train-00001": (whole, "length"),
             "arith-train-00002": (whole[:-1], "eos")}

    class Given:
        def generate(self, jobs):
            return [given[j.row_id] for j in jobs]

        def info(self):
            return {"backend": "given"}

        def close(self):
            pass

    monkeypatch.setattr(kdpipe.generation.hf.HFGenerator, "load", classmethod(lambda cls, *a, **k: Given()))
    out = tmp_path / "g.jsonl"
    result = run_cli("generate", "--model", world.teacher, "--dataset", "kdpipe:arithmetic", "--limit", 3,
                     "--max-new-tokens", len(whole), "--device", "cpu", "--output", out)
    assert "1 ended, 2 hit --max-new-tokens; 2 stopped inside a character: cut before it" in result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["output"] for r in rows] == ["57 caf", "57 café", "57 caf"]  # no U+FFFD, stopped by length or EOS
    for r in rows[0::2]:
        assert r["kdpipe_generate"]["cut_mid_character"] == 1 and r["kdpipe_generate"]["new_tokens"] == len(whole) - 1
    assert "cut_mid_character" not in rows[1]["kdpipe_generate"]
