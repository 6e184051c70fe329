"""PyTorch + transformers on a GPU, on the workloads `scripts/gpu-check` runs of ours.

The model is SmolLM2-135M's shape with drawn weights (the weights cannot travel to the
GPU machine), from a folder holding config.json and tokenizer.json; the text is Moby Dick
from the corpus folder. Workloads, each timed after a warm-up with the device
synchronised, medians of `reps`:
  - prefill of 128, 512 and 2048 tokens (batch 1, logits at the last token) and greedy
    decode after a 512-token prompt, like `bench_generate --random-weights`;
  - a training step of 16 x 1024 tokens: full-parameter (AdamW, weights in --dtype) and
    with gradients for activations only (the cost floor of a router-only conversion),
    like `bench_train --random-weights --batch-size 16 --seq-len 1024`.
Never run by CI or the tests.

    python3 -P benches/peers/pytorch_gpu.py CONFIG_DIR CORPUS_DIR [bf16|f32] [reps] [peak_tflops]
"""

import glob
import statistics
import sys
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

folder, corpus = sys.argv[1], sys.argv[2]
dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[sys.argv[3] if len(sys.argv) > 3 else "bf16"]
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
peak = float(sys.argv[5]) if len(sys.argv) > 5 else None
device = torch.device("cuda")
torch.manual_seed(0)

config = AutoConfig.from_pretrained(folder)
model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
text = "\n".join(open(f).read() for f in sorted(glob.glob(f"{corpus}/moby/*.txt")))
ids = Tokenizer.from_file(f"{folder}/tokenizer.json").encode(text, add_special_tokens=False).ids
ids = torch.tensor(ids[: 16 * 1024], device=device).unsqueeze(0)
params = sum(p.numel() for p in model.parameters())


def row(name, value, digits=1):
    print(f"{name:<30} {value:>12.{digits}f}", flush=True)


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def median_time(fn):
    return statistics.median([timed(fn) for _ in range(reps + 1)][1:])


model.eval()
with torch.inference_mode():
    for n in (128, 512, 2048):
        prompt = ids[:, :n]
        row(f"prefill {n} tokens/s", n / median_time(lambda: model(prompt, use_cache=True, logits_to_keep=1)))

    def decode(steps=32):
        out = model(ids[:, :512], use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return steps / (time.perf_counter() - start)

    row("decode tokens/s (after 512)", statistics.median([decode() for _ in range(reps + 1)][1:]))

batch = ids[:, : 16 * 1024].reshape(16, 1024)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)


def full_step():
    loss = model(batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


rate = batch.numel() / median_time(full_step)
row("train full-parameter tok/s", rate)
if peak:
    row("MFU (6 x params a token)", rate * 6 * params / (peak * 1e12), 3)
del opt
for p in model.parameters():
    p.requires_grad_(False)
    p.grad = None


def activation_step():
    embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=batch).loss.backward()


row("train activation-grad tok/s", batch.numel() / median_time(activation_step))
row("peak GPU memory allocated GiB", torch.cuda.max_memory_allocated() / 2**30, 2)
