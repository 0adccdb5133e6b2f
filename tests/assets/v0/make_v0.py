"""Write tests/data/v0-cache (a compact top-k cache and a plain one) and the student with the PREVIOUS
kdpipe (run with /work/wt-old's venv), train the student 6 steps on each, and record the losses."""
import json
import shutil
import sys
from pathlib import Path

from kdpipe import arithmetic, tiny
from kdpipe.stages import cache_teacher, train_student
from kdpipe.templates import ARITHMETIC

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
texts = [ARITHMETIC.format(instruction=r["instruction"]) + " " + r["output"] for r in arithmetic.generate("train")]
tok = tiny.train_tokenizer(texts, vocab_size=300)
work = Path("/tmp/v0work")
shutil.rmtree(work, ignore_errors=True)
tiny.init_model(work / "teacher", tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)
tiny.init_model(out / "student", tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=1)
losses = {}
for enc in ("compact", "plain"):
    cache = out / f"cache-{enc}"
    cfg = cache_teacher.CacheTeacherConfig(model=str(work / "teacher"), dataset="kdpipe:arithmetic", split="train",
                                           limit=48, top_k=8, encoding=enc, rows_per_shard=32, dtype="fp32",
                                           device="cpu", cache=str(cache))
    cache_teacher.run(cfg, "kdpipe cache-teacher (previous version, tests/data/v0)")
    (cache / ".lock").unlink(missing_ok=True)
    run = work / f"run-{enc}"
    tcfg = train_student.TrainStudentConfig(cache=str(cache), model=str(out / "student"), output=str(run),
                                            lora=False, max_steps=6, batch_size=8, logging_steps=1,
                                            save_steps=100, precision="fp32", lr=1e-3, seed=0)
    record = train_student.run(tcfg, "test")
    losses[enc] = [h["loss"] for h in record["log_history"] if "loss" in h]
(out / "losses.json").write_text(json.dumps({"written_by": "kdpipe 6b890b6 (before issue 13)", "options": {
    "lora": False, "max_steps": 6, "batch_size": 8, "logging_steps": 1, "precision": "fp32", "lr": 1e-3, "seed": 0},
    "losses": losses}, indent=1) + "\n")
print(json.dumps(losses))
