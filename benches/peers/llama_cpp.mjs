// llama.cpp (through node-llama-cpp's prebuilt CPU binary) on the same workloads as
// `cargo run --release --example bench_generate`: prefill of 128, 512 and 2048 tokens of
// Moby Dick, and greedy decode after a 512-token prompt; medians, 2 threads.
//
// Set-up (never run by CI or the tests), from the repository root:
//   mkdir -p out/peers/node && (cd out/peers/node && \
//     NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install node-llama-cpp@3.22.1)
//   NODE_PATH=out/peers/node/node_modules node benches/peers/llama_cpp.mjs \
//     assets/model/SmolLM2-135M-Instruct.Q4_1.gguf [reps] [decode_steps]
//
// The F32 row: run it on the F32 copy that benches/peers/gguf_to_f32.py writes
// (out/peers/SmolLM2-135M-Instruct.F32.gguf).
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const require = createRequire(path.resolve("out/peers/node/package.json"));
const { getLlama, LlamaLogLevel } = await import(require.resolve("node-llama-cpp"));

const [modelPath, repsArg, stepsArg] = process.argv.slice(2).filter((a) => !a.startsWith("--"));
const reps = Number(repsArg ?? 3);
const decodeSteps = Number(stepsArg ?? 32);
const threads = 2;

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({
  contextSize: 4096,
  flashAttention: true,
  threads: { ideal: threads, min: threads },
  batchSize: 2048,
});
const sequence = context.getSequence();

const dir = "assets/corpus/moby";
const text = fs.readdirSync(dir).filter((f) => f.endsWith(".txt")).sort()
  .map((f) => fs.readFileSync(path.join(dir, f), "utf8")).join("\n");
const tokens = model.tokenize(text.slice(0, 40000));

const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
const now = () => Number(process.hrtime.bigint()) / 1e9;

for (const n of [128, 512, 2048]) {
  const times = [];
  for (let rep = 0; rep <= reps; rep++) {
    await sequence.clearHistory();
    const t = now();
    await sequence.evaluateWithoutGeneratingNewTokens(tokens.slice(0, n));
    if (rep > 0) times.push(now() - t);
  }
  console.log(`prefill ${n} tokens/s`.padEnd(30), (n / median(times)).toFixed(1).padStart(12));
}

const rates = [];
for (let rep = 0; rep <= reps; rep++) {
  await sequence.clearHistory();
  await sequence.evaluateWithoutGeneratingNewTokens(tokens.slice(0, 511));
  // The 512th prompt token is evaluated with the first generated one; count only the
  // steps after it.
  let count = 0;
  let t = 0;
  for await (const _ of sequence.evaluate([tokens[511]], { temperature: 0 })) {
    if (count === 0) t = now();
    if (++count > decodeSteps) break;
  }
  if (rep > 0) rates.push(decodeSteps / (now() - t));
}
console.log(`decode tokens/s (after 512)`.padEnd(30), median(rates).toFixed(1).padStart(12));
await context.dispose();
await model.dispose();
