# Session 15's variant of the reference prototype (../shared/reference/modif_prototype.py): which part of a
# decoder layer to route, and how to hold the compute budget, with full-parameter healing. Not part of the
# crate; CI never runs it. Every layer routable, KL to the original (a frozen copy), threshold p = 0.5,
# straight-through (ste2), one sink, kv=keep, gates from zero weights and bias 2, router lr 1e-3, base lr 3e-5.
# One budget `target=F` over the whole model's multiply-adds (lm_head included, the crate's definition):
# the load term pushes the gates, weighted by what skipping them saves, while the step's compute is above F.
#   sub=block  one gate per layer for the whole block (MoD / MoDification)
#   sub=split  one gate for the attention sublayer and one for the MLP (each may skip alone)
#   sub=mlp    attention for every token; only the MLP is routed (FlexiDepth's split)
#   ctl=onoff  (default) push at alpha while compute > F; ctl=dual: lambda += eta·(compute − F), push at lambda
#   hid=β      (session 16) adds β · the mean over layers of each layer output's relative squared error
#              against the teacher's, ‖h − h_teacher‖² / ‖h_teacher‖² per token (intermediate distillation)
# Usage: python prototype-sublayer.py model=<HF folder from the exporter> corpus=assets/corpus \
#            sub=block|split|mlp [ctl=onoff|dual eta=1.0] steps=80 target=0.85 [alpha=0.1] [train=all|routers]
# Prints the held-out perplexity ratio per source (first 4 × 256 tokens of each), the held-out compute
# fraction and the kept fraction of attention and MLP per layer. 80 steps take about 13 minutes on 2 cores.
import torch, time, json, sys, random, glob, math
import torch.nn as nn, torch.nn.functional as F
from transformers import AutoTokenizer, AutoModelForCausalLM
torch.set_num_threads(2); torch.manual_seed(0); random.seed(0)
args = dict(a.split('=') for a in sys.argv[1:] if '=' in a)
ALPHA = float(args.get('alpha', 0.1)); P = 0.5; STEPS = int(args.get('steps', 80))
LR = float(args.get('lr', 1e-3)); BLR = float(args.get('blr', 3e-5)); BIAS = float(args.get('bias', 2.0))
SUB = args.get('sub', 'block'); BUDGET = float(args.get('target', 0.85)); TRAIN = args.get('train', 'all')
T, B = 256, 4
MODEL = args['model']; CORPUS = args['corpus']
tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
for p_ in model.parameters(): p_.requires_grad_(TRAIN == 'all')
teacher = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
for p_ in teacher.parameters(): p_.requires_grad_(False)
cfg = model.config
L = cfg.num_hidden_layers; D = cfg.hidden_size; I = cfg.intermediate_size; V = cfg.vocab_size
H = cfg.num_attention_heads; KVH = cfg.num_key_value_heads; HD = D // H
# multiply-accumulates per token (mean context (T+1)/2 for the scores)
c_kv = 2 * D * KVH * HD; c_qo = 2 * D * D; c_att = 2 * H * HD * (T + 1) / 2; c_mlp = 3 * D * I
c_attn_skip = c_qo + c_att            # kv=keep: a skipped token still writes its K/V
dense = L * (c_kv + c_qo + c_att + c_mlp) + V * D
routed = list(range(L))
def mk():
    g = nn.Linear(D, 1); nn.init.zeros_(g.weight); nn.init.constant_(g.bias, BIAS); return g
ga = nn.ModuleDict({str(j): mk() for j in routed}) if SUB in ('split', 'attn', 'block') else None
gm = nn.ModuleDict({str(j): mk() for j in routed}) if SUB in ('split', 'mlp') else None
eos = tok.eos_token_id if tok.eos_token_id is not None else cfg.eos_token_id
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
held = {k: [v[i*T:(i+1)*T] for i in range(4)] for k, v in data.items()}
train = {k: v[4*T:] for k, v in data.items()}
def batch(rng):
    rows = []
    for _ in range(B):
        k = rng.choice(list(train)); v = train[k]; s = rng.randrange(0, len(v) - T - 1); rows.append(v[s:s+T])
    return torch.tensor(rows)
stats = {}
def gate(gd, j, x):
    logit = gd[str(j)](x).squeeze(-1); g = torch.sigmoid(logit)
    keep = (g >= P).clone(); keep[:, :1] = True
    w = keep.float() + g - g.detach()
    return w, keep.float().mean(), g.mean()
def make_forward(j, layer):
    def fwd(hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kw):
        x = hidden_states
        one = (torch.ones(x.shape[:2]), torch.tensor(1.0), torch.tensor(0.0))
        wa, ka, gma = gate(ga, j, x) if ga is not None else one
        h = layer.input_layernorm(x)
        a = layer.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                            position_embeddings=position_embeddings, **kw)[0]
        x1 = x + wa.unsqueeze(-1) * a
        if SUB == 'block': wm, km, gmm = wa, ka, gma
        elif gm is not None: wm, km, gmm = gate(gm, j, x1)
        else: wm, km, gmm = one
        y = x1 + wm.unsqueeze(-1) * layer.mlp(layer.post_attention_layernorm(x1))
        stats[j] = (ka, gma, km, gmm); student_h[j] = y
        return y
    layer.forward = fwd
for j in routed: make_forward(j, model.model.layers[j])
HID = float(args.get('hid', 0.0)); student_h, teacher_h = {}, {}
def keep_output(j):
    def hook(module, inputs, out): teacher_h[j] = out[0] if isinstance(out, tuple) else out
    return hook
for j in range(L): teacher.model.layers[j].register_forward_hook(keep_output(j))
def hidden_loss():
    errs = [((student_h[j] - teacher_h[j]) ** 2).sum(-1) / (teacher_h[j] ** 2).sum(-1).clamp_min(1e-6) for j in routed]
    return torch.stack([e.mean() for e in errs]).mean()
def compute_fraction():
    saved = sum((1 - stats[j][0]) * c_attn_skip + (1 - stats[j][2]) * c_mlp for j in routed)
    return 1 - saved / dense
def evaluate(m, patched=True):
    m.eval(); res = {}; comp = []; kept = {j: [0.0, 0.0] for j in routed}
    with torch.no_grad():
        for k, seqs in held.items():
            x = torch.tensor(seqs); lg = m(x).logits
            nll = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1)).item()
            res[k] = math.exp(nll)
            if patched:
                comp.append(float(compute_fraction()))
                for j in routed: kept[j][0] += float(stats[j][0]) / 5; kept[j][1] += float(stats[j][2]) / 5
    m.train(); return res, (sum(comp) / len(comp) if comp else 1.0), kept
groups = [{'params': [p for gd in (ga, gm) if gd is not None for p in gd.parameters()], 'lr': LR}]
if TRAIN == 'all': groups.append({'params': list(model.parameters()), 'lr': BLR})
opt = torch.optim.AdamW(groups, weight_decay=0.0)
print('config', args, 'dense MACs/token', dense, flush=True)
orig, _, _ = evaluate(teacher, False); print('original', {k: round(v, 3) for k, v in orig.items()}, flush=True)
rng = random.Random(2); t0 = time.time()
CTL = args.get('ctl', 'onoff'); ETA = float(args.get('eta', 1.0)); lam = 0.0
for step in range(1, STEPS + 1):
    x = batch(rng)
    with torch.no_grad(): tlg = teacher(x).logits
    lg = model(x).logits
    kl = F.kl_div(F.log_softmax(lg, -1).reshape(-1, V), F.log_softmax(tlg, -1).reshape(-1, V), log_target=True, reduction='batchmean')
    C = float(compute_fraction())
    wa_, wm_ = c_attn_skip / (c_attn_skip + c_mlp), c_mlp / (c_attn_skip + c_mlp)
    if SUB == 'block': push = sum(stats[j][1] for j in routed)
    else: push = sum(wa_ * stats[j][1] + wm_ * stats[j][3] for j in routed) / (wa_ * (ga is not None) + wm_ * (gm is not None))
    if CTL == 'dual':   # integral control: lambda grows while compute is above the budget, shrinks below
        lam = max(0.0, lam + ETA * (C - BUDGET)); aux = lam * push
    else: aux = ALPHA * float(C > BUDGET) * push
    hid = hidden_loss() if HID > 0 else torch.tensor(0.0)
    loss = kl + HID * hid + aux; opt.zero_grad(); loss.backward(); opt.step()
    if step % 10 == 0:
        print(f'step {step} kl {kl.item():.3f} hid {hid.item():.4f} compute {C:.3f} lam {lam:.3f} {B*T*step/(time.time()-t0):.0f} tok/s', flush=True)
pf, comp, kept = evaluate(model)
ratio = {k: pf[k] / orig[k] for k in pf}
print('final', {k: round(v, 3) for k, v in ratio.items()}, 'compute', round(comp, 3), 'worst', round(max(ratio.values()), 3),
      'mean', round(sum(ratio.values()) / 5, 3), 'time', round(time.time() - t0), flush=True)
print('kept attn/mlp per layer', {j: (round(a, 2), round(m, 2)) for j, (a, m) in kept.items()}, flush=True)
print(json.dumps(dict(args=args, ratio=ratio, compute=comp, kept=kept)))
