"""PyTorch + transformers on the same workloads as the crate's bench examples.

Prefill of 128, 512 and 2048 tokens of Moby Dick and greedy decode after a 512-token
prompt (`cargo run --release --example bench_generate`); a training step of 4 x 256
tokens, full-parameter (AdamW) and with gradients for activations only, the cost floor of
a router-only conversion (`cargo run --release --example bench_train`). float32, 2
threads, medians. With a fourth argument `bf16`, the float32 model's products run in bf16
through oneDNN (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`: AMX tiles where
the CPU has them), the peer of the crate's `--matmul bf16`. Never run by CI or the tests.

Set-up, from the repository root:
    python3 -m venv out/peers/venv && out/peers/venv/bin/pip install torch transformers safetensors
    cargo run --release --example export            # writes out/smollm2-hf
    out/peers/venv/bin/python benches/peers/pytorch.py out/smollm2-hf [reps] [decode_steps] [bf16]
With PEER_INFERENCE_ONLY=1 in the environment it stops after prefill and decode.
"""

import glob
import os
import resource
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2-hf"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
decode_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 32
if len(sys.argv) > 4 and sys.argv[4] == "bf16":
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    print(f"{'matmul precision':<30} {'bf16':>12}")
torch.set_num_threads(2)

tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
model.eval()
text = "\n".join(open(f).read() for f in sorted(glob.glob("assets/corpus/moby/*.txt")))
ids = tok(text[:40000], add_special_tokens=False, return_tensors="pt").input_ids


def row(name, value):
    print(f"{name:<30} {value:>12.1f}", flush=True)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


with torch.inference_mode():
    for n in (128, 512, 2048):
        prompt = ids[:, :n]
        times = [timed(lambda: model(prompt, use_cache=True, logits_to_keep=1))
                 for _ in range(reps + 1)][1:]
        row(f"prefill {n} tokens/s", n / statistics.median(times))

    def decode():
        out = model(ids[:, :512], use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(decode_steps):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return decode_steps / (time.perf_counter() - start)

    rates = [decode() for _ in range(reps + 1)][1:]
    row("decode tokens/s (after 512)", statistics.median(rates))

if os.environ.get("PEER_INFERENCE_ONLY"):
    sys.exit(0)

# Training: 4 rows of 256 tokens.
batch = ids[:, : 4 * 256].reshape(4, 256)
model.train()


def full_step(opt):
    loss = model(batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
times = [timed(lambda: full_step(opt)) for _ in range(reps + 1)][1:]
row("train full-parameter tok/s", batch.numel() / statistics.median(times))


def activation_step():
    embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=batch).loss
    loss.backward()


for p in model.parameters():
    p.requires_grad_(False)
times = [timed(activation_step) for _ in range(reps + 1)][1:]
row("train activation-grad tok/s", batch.numel() / statistics.median(times))
peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"{'peak resident GB':<30} {peak_gb:>12.2f}")
