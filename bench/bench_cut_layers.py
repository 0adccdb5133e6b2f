"""Which layers a model can lose: KL of the cut model to the whole one, for evenly spaced and contiguous cuts.

    .venv/bin/python bench/bench_cut_layers.py --model DIR [--data FILE.jsonl] [--rows 16] [--blocks 5,10,15]

The text is the first --rows "text" fields of --data (or a few fixed sentences) and two general sentences;
the model runs once whole, then once per cut with its decoder layers listed as `init-model --from
--layer-ids` would keep them (the same modules, in order; nothing is trained). Printed: the mean KL(whole ||
cut) per token in nats, for N evenly spaced layers (`init-model --layers N`: first and last kept) and for
each contiguous block of B layers dropped (start s: layers s .. s+B-1 dropped, in steps of 2). Used to pick
the real-teacher bench's and demo-real's student (docs/results/real-teacher.md).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GENERAL = " The capital of France is Paris. Water boils at 100 degrees Celsius, and ice melts at zero."


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdpipe.students import evenly_spaced

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", help="a JSONL file with a 'text' field")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--blocks", default="5,10,15")
    p.add_argument("--even", default="6,15,21")
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    rows = [json.loads(line)["text"] for line in open(a.data)][: a.rows] if a.data else ["I liked the film."]
    ids = tok(" ".join(rows) + GENERAL, return_tensors="pt").input_ids
    layers = list(model.model.layers)
    n = len(layers)
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)

    def kl(keep: list[int]) -> float:
        model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
        model.config.num_hidden_layers = len(keep)
        with torch.no_grad():
            lp = model(ids).logits.log_softmax(-1)
        model.model.layers, model.config.num_hidden_layers = torch.nn.ModuleList(layers), n
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    print(f"{a.model}: {n} layers, {ids.shape[1]} tokens; mean KL(whole || cut) per token, nats")
    for k in map(int, a.even.split(",")):
        print(f"  {k} layers evenly spaced (init-model --layers {k}): {kl(evenly_spaced(n, k)):.2f}")
    for b in map(int, a.blocks.split(",")):
        cells = [f"{s}-{s + b - 1}: {kl([i for i in range(n) if not s <= i < s + b]):.2f}"
                 for s in range(1, n - b + 1, 2)]
        print(f"  {b} layers dropped ({n - b} kept), by the block dropped:")
        for i in range(0, len(cells), 7):
            print("    " + "   ".join(cells[i : i + 7]))


if __name__ == "__main__":
    main()
