# Session 8's variant of the reference prototype (../shared/reference/modif_prototype.py), used for
# the README's prototype rows on skip adapters and MLP-only routing. Not part of the crate; CI never
# runs it. Added options: adapter=R (a skipped token gets x + U·silu(D·RMSNorm(x)), rank R, U zero at
# the start; adapter_lr), skipwhat=block|mlp (mlp: attention for every token, only the MLP routed).
# Example (the README's rows): ... mode=ste2 obj=kl layers=all kv=keep sink=1 winit=0 alpha=0.5
#   gtarget=0.8 steps=80 [adapter=16]   |   gtarget=0.75 skipwhat=mlp
# Reference prototype of MoDification conversion in PyTorch + HF transformers, for side-by-side comparison.
# Not part of the crate. Routing is simulated with attention masks (the block is computed for every token and the
# result is kept or dropped), so its speed means nothing; its quality numbers are the reference.
# Usage: python modif_prototype.py model=<HF folder> corpus=<folder with moby/ sotu/ email/ pydoc/ zh/> \
#        mode=ste2 alpha=0.01 steps=80 sink=1 winit=0 kv=keep [gnorm=1] [p=0.5] [lr=1e-3] [bias=2] [train=routers|all]
# target=F: the load term pushes a layer only while its kept fraction is above F (alpha scales it).
# gtarget=F: one budget for all routed layers: push every gate while the mean kept fraction is above F.
# layers=odd|all: which layers get a router.
# obj=lm|kl: LM loss (paper) or KL to the original model (a separate frozen copy; self-distillation).
# gnorm=1: the gate reads the layer's input-RMSNorm output instead of the raw residual stream (massive activations).
# mode: mult (gate multiplies kept tokens' delta, paper), ste (straight-through on kept tokens only),
#       ste2 (hard forward, gate gradient for every token), ste2m (mult on kept + straight-through on skipped).
# kv: skip (skipped tokens are not keys at that layer) | keep (skipped tokens still serve as keys/values).
import torch, time, json, sys, random, glob, os, math
import torch.nn as nn, torch.nn.functional as F
from transformers import AutoTokenizer, AutoModelForCausalLM
torch.set_num_threads(2); torch.manual_seed(0); random.seed(0)
args = dict(a.split('=') for a in sys.argv[1:])
ALPHA = float(args.get('alpha', 0.01)); P = float(args.get('p', 0.5)); STEPS = int(args.get('steps', 80))
MODE = args.get('mode', 'mult'); LR = float(args.get('lr', 1e-3)); BIAS = float(args.get('bias', 2.0))
ROUTER = args.get('router', 'thr'); CAP = float(args.get('cap', 0.5)); TRAIN = args.get('train', 'routers')
T, B = 256, 4
MODEL = args.get('model', 'model'); CORPUS = args.get('corpus', 'corpus')
tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
for p_ in model.parameters(): p_.requires_grad_(TRAIN == 'all')
# teacher for obj=kl: a separate, unpatched copy of the original weights (stays fixed when train=all adapts the base)
teacher = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval() if args.get('obj', 'lm') != 'lm' else None
if teacher is not None:
    for p_ in teacher.parameters(): p_.requires_grad_(False)
L = model.config.num_hidden_layers; D = model.config.hidden_size
routed = list(range(1, L, 2)) if args.get('layers', 'odd') == 'odd' else list(range(L))
gates = nn.ModuleDict({str(j): nn.Linear(D, 1) for j in routed})
WINIT = float(args.get('winit', 1e-3)); SINK = int(args.get('sink', 0))
for g in gates.values(): nn.init.normal_(g.weight, std=WINIT) if WINIT > 0 else nn.init.zeros_(g.weight); nn.init.constant_(g.bias, BIAS)
eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids('<|endoftext|>')
AR = int(args.get('adapter', 0))
class SkipAdapter(nn.Module):
    def __init__(s_, d, r, norm):
        super().__init__(); s_.norm = norm; s_.down = nn.Linear(d, r, bias=False); s_.up = nn.Linear(r, d, bias=False)
        nn.init.zeros_(s_.up.weight); s_.act = args.get('adapter_act', 'silu')
    def forward(s_, x):
        h = s_.down(s_.norm(x))
        if s_.act == 'silu': h = F.silu(h)
        return s_.up(h)
adapters = nn.ModuleDict({str(j): SkipAdapter(D, AR, model.model.layers[j].input_layernorm) for j in routed}) if AR > 0 else None
def load_source(pat, maxchars):
    files = sorted(glob.glob(pat, recursive=True)); random.Random(1).shuffle(files)
    ids, n = [], 0
    for f in files:
        t = open(f, encoding='utf8', errors='replace').read()
        ids += tok(t, add_special_tokens=False).input_ids + [eos]; n += len(t)
        if n > maxchars: break
    return ids
srcs = {k: f'{CORPUS}/{k}/**/*.txt' for k in ('moby', 'sotu', 'email', 'pydoc', 'zh')}
data = {k: load_source(v, 600_000) for k, v in srcs.items()}
held = {k: [v[i*T:(i+1)*T] for i in range(4)] for k, v in data.items()}          # first 4 seqs held out
train = {k: v[4*T:] for k, v in data.items()}
def batch(rng):
    rows = []
    for _ in range(B):
        k = rng.choice(list(train)); v = train[k]; s = rng.randrange(0, len(v) - T - 1); rows.append(v[s:s+T])
    return torch.tensor(rows)
stats = {}
FORCE = [False]   # teacher pass: every gate open, dense model
def make_forward(j, layer):
    orig = layer.forward
    def fwd(hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kw):
        x = hidden_states; Bq, Tq, _ = x.shape
        gin = layer.input_layernorm(x) if args.get('gnorm', '0') == '1' else x
        logit = gates[str(j)](gin).squeeze(-1); g = torch.sigmoid(logit)
        if ROUTER == 'thr': keep = (g >= P)
        else:
            k = max(1, math.ceil(CAP * Tq)); idx = logit.topk(k, -1).indices
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)
        if SINK > 0: keep = keep.clone(); keep[:, :SINK] = True
        if FORCE[0]: keep = torch.ones_like(keep)
        causal = torch.ones(Tq, Tq, dtype=torch.bool).tril()
        allow = causal[None] & (keep[:, None, :] if args.get('kv', 'skip') == 'skip' else torch.ones_like(keep)[:, None, :])
        allow = allow | torch.eye(Tq, dtype=torch.bool)[None]
        m = torch.zeros(Bq, 1, Tq, Tq).masked_fill(~allow[:, None], float('-inf'))
        if args.get('skipwhat', 'block') == 'mlp':
            # attention for every token (dense causal mask); only the MLP is routed
            dm = torch.zeros(Bq, 1, Tq, Tq).masked_fill(~causal[None, None], float('-inf'))
            hn = layer.input_layernorm(x)
            a_out = layer.self_attn(hidden_states=hn, attention_mask=dm, position_ids=position_ids, position_embeddings=position_embeddings)[0]
            xa = x + a_out
            out = xa + layer.mlp(layer.post_attention_layernorm(xa))
            x = xa   # the routed decision applies to the MLP's update only
        else:
            out = orig(x, attention_mask=m, position_ids=position_ids, position_embeddings=position_embeddings, **kw)
            out = out[0] if isinstance(out, tuple) else out
        kf = keep.float()
        if FORCE[0]: return out
        if MODE == 'mult': w = kf * g
        elif MODE == 'ste': w = kf * (1 + g - g.detach())
        elif MODE == 'ste2': w = kf + g - g.detach()          # hard forward, gradient of g for every token
        elif MODE == 'ste2m': w = kf * g + (g - g.detach()) * (1 - kf)  # multiply for kept, STE signal for skipped
        sub = x + adapters[str(j)](x) if adapters is not None else x
        y = sub + w.unsqueeze(-1) * (out - sub)
        stats[j] = (keep.float().mean(), g.mean())
        return y
    layer.forward = fwd
for j in routed: make_forward(j, model.model.layers[j])
model.config._attn_implementation = 'eager'
def evaluate():
    model.eval(); res = {}; kept = {j: [] for j in routed}
    with torch.no_grad():
        for k, seqs in held.items():
            x = torch.tensor(seqs); lg = model(x).logits
            nll = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1)).item()
            res[k] = math.exp(nll)
            for j in routed: kept[j].append(stats[j][0].item())
    model.train(); return res, {j: sum(v)/len(v) for j, v in kept.items()}
params = list(gates.parameters()) + ([p_ for p_ in model.parameters()] if TRAIN == 'all' else [])
opt = torch.optim.AdamW([{'params': list(gates.parameters()), 'lr': LR}] + ([{'params': [p for n, p in adapters.named_parameters() if 'norm' not in n], 'lr': float(args.get('adapter_lr', 1e-3))}] if adapters is not None else []) + ([{'params': [p_ for p_ in model.parameters()], 'lr': 3e-5}] if TRAIN == 'all' else []), weight_decay=0.0)
print('config', args, flush=True)
# original ppl (all gates open with huge bias)
saved = {j: gates[str(j)].bias.data.clone() for j in routed}
for j in routed: gates[str(j)].bias.data.fill_(50.0)
MODE_SAVE = MODE; MODE = 'ste'; ROUTER_SAVE = ROUTER; ROUTER = 'thr'
orig_ppl, _ = evaluate(); print('original', {k: round(v, 3) for k, v in orig_ppl.items()}, flush=True)
MODE = MODE_SAVE; ROUTER = ROUTER_SAVE
for j in routed: gates[str(j)].bias.data.copy_(saved[j])
p0, k0 = evaluate(); print('step0', {k: round(v, 3) for k, v in p0.items()}, 'kept', round(sum(k0.values())/len(k0), 3), flush=True)
rng = random.Random(2); t0 = time.time()
for step in range(1, STEPS + 1):
    x = batch(rng)
    OBJ = args.get('obj', 'lm')
    if OBJ != 'lm':
        with torch.no_grad(): tlg = teacher(x).logits
    lg = model(x).logits
    lm = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1))
    if OBJ == 'kl':
        lm = F.kl_div(F.log_softmax(lg, -1).reshape(-1, lg.shape[-1]), F.log_softmax(tlg, -1).reshape(-1, lg.shape[-1]), log_target=True, reduction='batchmean')
    TGT = float(args.get('target', -1))
    GT = float(args.get('gtarget', -1))
    if GT > 0:   # one budget shared by all routed layers: push every gate while the mean kept fraction is above GT
        mk = sum(stats[j][0] for j in routed) / len(routed)
        aux = ALPHA * (mk > GT).float() * sum(stats[j][1] for j in routed)
    elif TGT > 0: aux = ALPHA * sum((stats[j][0] > TGT).float() * stats[j][1] for j in routed)   # push only above target
    else: aux = ALPHA * sum(stats[j][0].detach() * stats[j][1] for j in routed)
    loss = lm + aux; opt.zero_grad(); loss.backward(); opt.step()
    if step % 10 == 0:
        kept = sum(stats[j][0].item() for j in routed) / len(routed)
        print(f'step {step} lm {lm.item():.3f} aux {aux.item():.4f} kept {kept:.3f} {B*T*step/(time.time()-t0):.0f} tok/s', flush=True)
pf, kf = evaluate()
skip = 1 - sum(kf.values()) / len(kf)
ratio = {k: pf[k] / orig_ppl[k] for k in pf}
print('final', {k: round(v, 3) for k, v in pf.items()}, 'skip', round(skip, 3), 'worst ratio', round(max(ratio.values()), 3), flush=True)
print('kept per layer', {j: round(v, 2) for j, v in kf.items()}, flush=True)
print(json.dumps(dict(args=args, orig=orig_ppl, final=pf, kept=kf, skip=skip, ratio=ratio)))
