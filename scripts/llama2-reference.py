#!/usr/bin/env python3
"""The independent reference of tests/llama2.rs: HF transformers on the LLaMA-2-shaped
checkpoint that the test writes (run `cargo test --release --test llama2` first).

Prints, for the first 24 reference ids of llama-tokenizer-js's long test text:
  - the logits transformers computes from the sharded HF folder (float32, eager attention)
    at positions 0, 7 and 23 for tokens 0, 1, 13, 450, 29871, 31999, and each row's sum,
    as the Rust constants the test holds;
  - the largest difference to transformers' own load of the same weights from the GGUF
    (its dequantizer and q/k un-permutation, not ours);
  - whether transformers' tokenizer built from the GGUF metadata gives the reference ids
    for each of the package's test strings.

usage: python3 scripts/llama2-reference.py [target/llama2-fixture]
needs: torch, transformers, gguf, sentencepiece (pip); not run by CI.
"""
import json
import pathlib
import sys

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

root = pathlib.Path(__file__).resolve().parent.parent
fixture = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else root / "target/llama2-fixture"
reference = json.loads((root / "assets/llama-tokenizer/reference.json").read_text())
ids = reference["cases"][11]["ids"][:24]
positions, tokens = [0, 7, 23], [0, 1, 13, 450, 29871, 31999]

torch.set_grad_enabled(False)
hf = LlamaForCausalLM.from_pretrained(
    fixture / "hf", dtype=torch.float32, attn_implementation="eager"
).eval()
logits = hf(torch.tensor([ids])).logits[0]

print(f"// transformers {__import__('transformers').__version__}, torch {torch.__version__}")
print("const TRANSFORMERS_LOGITS: [[f32; 6]; 3] = [")
for p in positions:
    print("    [" + ", ".join(f"{logits[p, t].item():.7}" for t in tokens) + "],")
print("];")
print("const TRANSFORMERS_ROW_SUMS: [f32; 3] = ["
      + ", ".join(f"{logits[p].sum().item():.7}" for p in positions) + "];")

from_gguf = LlamaForCausalLM.from_pretrained(
    fixture, gguf_file="model.gguf", dtype=torch.float32, attn_implementation="eager"
).eval()
diff = (from_gguf(torch.tensor([ids])).logits[0] - logits).abs().max().item()
print(f"// transformers' GGUF load vs its safetensors load: max |diff| = {diff:.3g}")

tok = AutoTokenizer.from_pretrained(fixture, gguf_file="model.gguf")
for case in reference["cases"]:
    got = tok(case["text"])["input_ids"]
    status = "same" if got == case["ids"] else f"DIFFERENT: {got[:12]}..."
    print(f"// transformers GGUF tokenizer on {case['text'][:20]!r}: {status}")
