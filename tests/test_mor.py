"""Mixture-of-Recursions (`mor`): one recursion = the plain HF model; every token through every recursion = the
looped (unrolled) model; partial routing = a dense masked reference; KV-cached decoding = recomputation; padding;
checkpoints; bad arguments; router-loss gradients; the FLOPs ledger = torch's FLOP counter. Float64, tiny models."""
import copy, tempfile
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from latent_thoughts.core import build_lm, MethodLM, METHODS
from latent_thoughts.mor import MoRLM, compact, topk_rows, decoder_parts
from latent_thoughts import flops

ARCHS = ('gpt_neox', 'llama', 'gpt2')
V = 61
NO_DROPOUT = {'gpt2': dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


def tiny(arch, n_layer=4, dtype=torch.float64, seed=0, attn='sdpa'):
    return build_lm(arch, seed=seed, vocab_size=V, d_model=32, n_layer=n_layer, n_head=4, max_positions=128,
                    attn_implementation=attn, dtype=dtype, **NO_DROPOUT.get(arch, {}))


def maxdiff(a, b): return (a - b).abs().max().item()


# ---------------------------------------------------------------- independent references

def layer_list(lm):
    b = lm.base_model
    return b, ('layers' if hasattr(b, 'layers') else 'h')

def split(Ls, sharing):
    return (Ls[:1], Ls[1:-1], Ls[-1:]) if sharing == 'middle_cycle' else ([], Ls, [])

class Gated(nn.Module):
    "Reference piece: one recursion of the block with the paper's gate, H + alpha*sigmoid(router(H))*f(H)."
    def __init__(self, layers, router, alpha):
        super().__init__(); self.layers, self.router, self.alpha = nn.ModuleList(layers), router, alpha
    def forward(self, x, *args, **kwargs):
        g = torch.sigmoid(self.router(x)) * self.alpha
        y = x
        for l in self.layers: y = l(y, *args, **kwargs)
        return x + g * y

class TokenChoice(nn.Module):
    "Reference piece: the token-choice exit with every token at full depth, H_in + p_last * f^N(H_in)."
    def __init__(self, layers, router, alpha):
        super().__init__(); self.layers, self.router, self.alpha = nn.ModuleList(layers), router, alpha
    def forward(self, x, *args, **kwargs):
        g = self.router(x).softmax(-1)[..., -1:] * self.alpha
        y = x
        for l in self.layers: y = l(y, *args, **kwargs)
        return x + g * y

def unrolled(lm, N, sharing, wrap=None):
    "The plain HF model with its layer list unrolled (first layer, the block N times, last layer); HF's own forward."
    u = copy.deepcopy(lm); base, name = layer_list(u)
    pre, blk, post = split(list(getattr(base, name)), sharing)
    mid = blk * N if wrap is None else wrap(blk)
    setattr(base, name, nn.ModuleList(pre + mid + post)); u.config.num_hidden_layers = len(getattr(base, name))
    return u   # call with use_cache=False: repeated layers share a cache index

def dense_reference(m, ids):
    "MoR logits written out token-densely: every recursion runs the block on all tokens with a 4-D mask that hides"
    "the unrouted keys; the routing decisions are made here by hand (top-k by sorting, or the threshold)."
    lm = m.lm; base, name = layer_list(lm)
    B, T = ids.shape
    pre, blk, post = split(list(getattr(base, name)), m.sharing)
    norm = next(getattr(base, n) for n in ('norm', 'final_layer_norm', 'ln_f') if hasattr(base, n))
    pos = torch.arange(T)[None].expand(B, -1)
    x = lm.get_input_embeddings()(ids)
    if hasattr(base, 'wpe'): x = x + base.wpe(pos)
    pe = base.rotary_emb(x, pos) if hasattr(base, 'rotary_emb') else None
    causal = torch.ones(T, T).tril().bool()[None].expand(B, -1, -1)
    eye = torch.eye(T).bool()[None]
    def run(layers, x, allowed):
        mask = torch.zeros(B, 1, T, T, dtype=x.dtype).masked_fill(~allowed[:, None], torch.finfo(x.dtype).min)
        for l in layers: x = l(x, attention_mask=mask, **({'position_embeddings': pe} if pe is not None else {}))
        return x
    x = run(pre, x, causal)
    if m.routing == 'expert':
        eligible = torch.ones(B, T, dtype=torch.bool)
        for r in range(m.n_recursions):
            logit = m.routers[r](x).squeeze(-1)
            if m.capacity[r] >= 1: sel = eligible.clone()
            elif m.training:
                sel = torch.zeros_like(eligible)
                k = max(1, int(m.capacity[r] * T + 1e-9))
                for b in range(B):
                    cand = [t for t in range(T) if eligible[b, t]]
                    for t in sorted(cand, key=lambda t: -logit[b, t].item())[:k]: sel[b, t] = True
            else: sel = eligible & (logit >= 0)
            y = run(blk, x, (causal & sel[:, None, :]) | eye)
            g = torch.sigmoid(logit)[..., None] * m.alpha
            x = torch.where(sel[..., None], x + g * y if m.gating == 'weighted' else y, x)
            eligible = sel
    else:
        probs = m.router(x).softmax(-1) * m.alpha
        depth = probs.argmax(-1); x0 = x
        for r in range(m.n_recursions):
            sel = depth >= r
            x = torch.where(sel[..., None], run(blk, x, (causal & sel[:, None, :]) | eye), x)
        if m.gating == 'weighted': x = x0 + probs.gather(-1, depth[..., None]) * x
    x = run(post, x, causal)
    return lm.get_output_embeddings()(norm(x))

def greedy_recompute(m, ids, n):
    for _ in range(n): ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


# ---------------------------------------------------------------- tests

def test_registered():
    assert METHODS['mor'] is MoRLM and flops.LEDGER['mor'] is not None

def test_helpers():
    sel = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]).bool()
    idx, valid = compact(sel)
    assert idx.shape == (3, 3) and idx[0].tolist() == [0, 2, 3] and idx[2, 0] == 1
    assert valid.long().tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    s = torch.randn(3, 4)
    got = topk_rows(s, torch.ones(3, 4).bool(), torch.tensor([2, 0, 4]))
    for b, k in enumerate((2, 0, 4)):
        assert set(got[b].nonzero().flatten().tolist()) == set(s[b].argsort(descending=True)[:k].tolist())

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('sharing', ['middle_cycle', 'cycle'])
def test_one_recursion_is_the_plain_model(arch, sharing):
    lm = tiny(arch).eval()
    ids = torch.randint(0, V, (2, 9)); am = torch.ones_like(ids); am[1, :3] = 0
    m = MoRLM(lm, n_recursions=1, sharing=sharing, gating='none').eval()
    with torch.no_grad():
        assert maxdiff(m(ids).logits, lm(ids).logits) < 1e-12
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        keep = am.bool()
        assert maxdiff(m(ids, attention_mask=am).logits[keep], lm(ids, attention_mask=am, position_ids=pos).logits[keep]) < 1e-12

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('sharing', ['middle_cycle', 'cycle'])
def test_every_token_every_recursion_is_the_looped_model(arch, sharing):
    lm = tiny(arch).eval()
    ids = torch.randint(0, V, (2, 10))
    for train in (False, True):   # training mode routes by top-k: capacity 1 keeps every token
        m = MoRLM(lm, n_recursions=3, sharing=sharing, capacity=[1, 1, 1], gating='none').train(train)
        with torch.no_grad():
            ref = unrolled(lm, 3, sharing)(ids, use_cache=False).logits
            out = m(ids)
        assert maxdiff(out.logits, ref) < 1e-12
        assert out.metrics['mor_steps'] == 3.0
        # the paper's gate, H + g*f(H), with the routers written into the unrolled model
        m = MoRLM(lm, n_recursions=3, sharing=sharing, capacity=[1, 1, 1]).train(train)
        it = iter(m.routers)
        ref = unrolled(lm, 3, sharing, wrap=lambda blk: [Gated(blk, next(it), m.alpha) for _ in range(3)])
        with torch.no_grad(): assert maxdiff(m(ids).logits, ref(ids, use_cache=False).logits) < 1e-12
    # token choice with a router that sends every token to the last depth
    m = MoRLM(lm, n_recursions=3, routing='token', sharing=sharing).eval()
    m.router = nn.Linear(32, 3, dtype=torch.float64)
    with torch.no_grad(): m.router.weight.zero_(); m.router.bias.copy_(torch.tensor([0., 1., 6.]))
    ref = unrolled(lm, 3, sharing, wrap=lambda blk: [TokenChoice(blk * 3, m.router, m.alpha)])
    with torch.no_grad():
        out = m(ids)
        assert maxdiff(out.logits, ref(ids, use_cache=False).logits) < 1e-12 and out.metrics['mor_steps'] == 3.0
        assert maxdiff(out.logits, lm(ids).logits) > 1e-3

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('kw', [dict(), dict(routing='token'), dict(gating='none', sharing='cycle'),
                                dict(n_recursions=4, capacity=[1, 0.75, 0.5, 0.25])], ids=str)
def test_partial_routing_equals_dense_reference(arch, kw):
    torch.manual_seed(3)
    ids = torch.randint(0, V, (3, 12))
    m = MoRLM(tiny(arch), **kw)
    with torch.no_grad():
        for train in (True, False):
            m.train(train)
            out = m(ids)
            assert maxdiff(out.logits, dense_reference(m, ids)) < 1e-10, train
            assert 1 < out.metrics['mor_steps'] < m.n_recursions     # routing is really partial

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('kw', [dict(), dict(inference_router='aux_router'), dict(routing='token'),
                                dict(sharing='cycle', n_recursions=2)], ids=str)
def test_cached_generation_and_padding(arch, kw):
    torch.manual_seed(1)
    m = MoRLM(tiny(arch), **kw).eval()
    if 'aux_router' in kw.values():   # a random auxiliary router would drop every token or none: spread its logits
        with torch.no_grad():
            for a, r in zip(m.aux_routers, m.routers): a.weight.copy_(r.weight * 3)
    ids = torch.randint(1, V, (3, 7)); am = torch.ones_like(ids); am[1, 4:] = 0; am[2, 2:] = 0
    n = 6
    with torch.no_grad():
        assert torch.equal(m.generate(ids, max_new_tokens=n), greedy_recompute(m, ids, n))
        gen = m.generate(ids, am, max_new_tokens=n)
        for i in range(3):
            alone = m.generate(ids[i:i+1, :int(am[i].sum())], max_new_tokens=n)
            assert torch.equal(gen[i, -n:], alone[0, -n:])
        # right and left padding: real tokens score as in their unpadded row
        lp_ids, lp_am = torch.zeros_like(ids), torch.zeros_like(am)
        lp_ids[1, 3:], lp_am[1, 3:] = ids[1, :4], 1; lp_ids[0], lp_am[0] = ids[0], 1; lp_ids[2, 5:], lp_am[2, 5:] = ids[2, :2], 1
        alone = m(ids[1:2, :4]).logits[0]
        assert maxdiff(m(ids, attention_mask=am).logits[1, :4], alone) < 1e-10
        assert maxdiff(m(lp_ids, attention_mask=lp_am).logits[1, 3:], alone) < 1e-10
        assert maxdiff(m.score(lp_ids, lp_am)[1].sum(), m.score(ids[1:2, :4])[0].sum()) < 1e-5   # score is float32

@pytest.mark.parametrize('routing', ['expert', 'token'])
def test_padding_in_training_mode(routing):
    "Top-k capacity counts each row's real tokens: padded rows route and score like unpadded ones."
    m = MoRLM(tiny('llama'), routing=routing).train()
    torch.manual_seed(0)
    a, other = torch.randint(1, V, (6,)), torch.randint(1, V, (9,))
    left, lm_ = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    left[0], lm_[0] = other, 1; left[1, 3:], lm_[1, 3:] = a, 1             # row 1: three pads, then a
    right, rm = left.clone(), lm_.clone(); right[1] = 0; rm[1] = 0; right[1, :6], rm[1, :6] = a, 1
    with torch.no_grad():
        alone = m(a[None])
        assert maxdiff(m(left, attention_mask=lm_).logits[1, 3:], alone.logits[0]) < 1e-10
        assert maxdiff(m(right, attention_mask=rm).logits[1, :6], alone.logits[0]) < 1e-10

def test_recursion_wise_cache_holds_only_routed_tokens():
    m = MoRLM(tiny('llama'), n_recursions=3).eval()
    ids = torch.randint(1, V, (1, 10))
    with torch.no_grad():
        logits, st = m.prefill(ids, torch.ones_like(ids))
        toks = [ids]
        for _ in range(5):
            nxt = logits.argmax(-1); toks.append(nxt[:, None]); logits, st = m.decode(nxt, st)
        full = torch.cat(toks, 1)                                       # every token the caches have seen
        out = m(full)
    L = len(m.parts.layers)
    assert st['caches'][0].get_seq_length(0) == st['caches'][0].get_seq_length(L - 1) == full.size(1)
    for r in range(3):
        routed = round(out.metrics[f'mor_frac_r{r + 1}'] * full.size(1))
        assert st['caches'][r + 1].get_seq_length(1) == routed == int(st['vmasks'][r].sum())
    assert st['caches'][3].get_seq_length(1) < full.size(1)            # the deepest recursion saw fewer tokens

@pytest.mark.parametrize('kw', [dict(), dict(routing='token', sharing='cycle'), dict(inference_router='aux_router', n_recursions=2)], ids=str)
def test_checkpoint_round_trip(kw):
    m = MoRLM(tiny('gpt_neox'), **kw).eval()
    ids = torch.randint(1, V, (2, 8))
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d)
        m2 = MethodLM.from_pretrained(d).eval()
        assert type(m2) is MoRLM and m2.method_config() == m.method_config()
        with torch.no_grad():
            o, o2 = m(ids), m2(ids)
            assert maxdiff(o2.logits, o.logits.float()) < 1e-5 and o2.metrics == o.metrics
        assert MoRLM.from_pretrained(d, eval_routing='topk').eval_routing == 'topk'

def test_bad_arguments_name_the_fix():
    lm = tiny('llama')
    with pytest.raises(ValueError, match="use sharing='cycle'"): MoRLM(tiny('llama', n_layer=2))
    with pytest.raises(ValueError, match='integer >= 1'): MoRLM(lm, n_recursions=0)
    with pytest.raises(ValueError, match='integer >= 1'): MoRLM(lm, n_recursions=2.0)
    with pytest.raises(ValueError, match='non-increasing'): MoRLM(lm, capacity=[0.5, 1, 1])
    with pytest.raises(ValueError, match='non-increasing'): MoRLM(lm, capacity=[1, 0.5])
    with pytest.raises(ValueError, match='non-increasing'): MoRLM(lm, capacity=[1, 0.5, 0])
    for k, v in dict(routing='topk', sharing='sequence', gating='soft', inference_router='mlp', eval_routing='greedy').items():
        with pytest.raises(ValueError, match=f'{k} must be one of'): MoRLM(lm, **{k: v})
    with pytest.raises(ValueError, match='does not match'): MoRLM(lm)(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="eval_routing='threshold'"):
        MoRLM(lm, eval_routing='topk').eval().generate(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match='gpt_neox, llama and gpt2'): decoder_parts(nn.Linear(2, 2))
    with pytest.raises(ValueError, match='mor_frac_r'): flops.flops_per_token('mor', 'tiny', step_fractions=[1, 0.5])

def test_expert_router_loss_gradient_direction():
    "The BCE pushes the logits of top-k-selected tokens up and of unselected ones down."
    torch.manual_seed(0)
    m = MoRLM(tiny('gpt_neox'), n_recursions=2, gating='none').train()   # ungated: the states do not depend on the routers
    ids = torch.randint(0, V, (2, 12))
    captured = {}
    hook = m.routers[1].register_forward_hook(lambda mod, inp, out: captured.update(x=inp[0].detach(), logit=out))
    out = m(ids); hook.remove()
    logit = captured['logit'].squeeze(-1)
    sel = topk_rows(logit.detach(), torch.ones(2, 12).bool(), torch.tensor([6, 6]))
    (gl,) = torch.autograd.grad(out.aux_loss, captured['logit'], retain_graph=True)
    assert (gl.squeeze(-1)[sel] < 0).all() and (gl.squeeze(-1)[~sel] > 0).all()     # descent raises chosen, lowers the rest
    # one step on the router's weight separates the chosen from the rest
    (g,) = torch.autograd.grad(out.aux_loss, m.routers[1].weight)
    new = captured['x'] @ (m.routers[1].weight - 1e3 * g)[0]
    gap = lambda l: (l[sel].mean() - l[~sel].mean()).item()
    assert gap(new) > gap(logit.detach())
    # the auxiliary router variant trains on detached states: its loss moves no weight of the model
    m = MoRLM(tiny('gpt_neox'), n_recursions=2, inference_router='aux_router', gating='none').train()
    aux = m(ids).aux_loss
    gs = torch.autograd.grad(aux, [p for n, p in m.named_parameters() if not n.startswith('aux_routers')], allow_unused=True)
    assert all(x is None or x.abs().max() == 0 for x in gs)
    assert torch.autograd.grad(aux, m.aux_routers[1].weight)[0].abs().max() > 0

def test_token_balancing_loss_gradient_direction():
    "All tokens choosing depth 1: the balancing loss lowers depth 1's probability and raises the others'."
    m = MoRLM(tiny('llama'), n_recursions=3, routing='token', z_loss_weight=0.0).train()
    m.router = nn.Linear(32, 3, dtype=torch.float64)
    with torch.no_grad(): m.router.weight.mul_(0.01); m.router.bias.copy_(torch.tensor([2., 0., 0.]))
    out = m(torch.randint(0, V, (2, 8)))
    assert out.metrics['mor_steps'] == 1.0
    (gb,) = torch.autograd.grad(out.aux_loss, m.router.bias)
    assert gb[0] > 0 and (gb[1:] < 0).all()
    test_loss = out.aux_loss.item() / 0.1                               # sum_i P_i f_i = 3 * P_1 here
    p1 = torch.softmax(torch.tensor([2., 0., 0.]), 0)[0].item()
    assert abs(test_loss - 3 * p1) < 0.02

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('kw', [dict(), dict(routing='token'), dict(inference_router='aux_router', sharing='cycle')], ids=str)
def test_flops_ledger_equals_flop_counter(arch, kw):
    lm = build_lm(arch, vocab_size=64, d_model=32, n_layer=4, n_head=4, attn_implementation='eager', **NO_DROPOUT.get(arch, {}))
    ids = torch.randint(0, 64, (1, 12))
    m = MoRLM(lm, **kw).train()
    with FlopCounterMode(display=False) as fc:
        out = m(ids, labels=ids); out.loss.backward()
    fr = [out.metrics[f'mor_frac_r{r}'] for r in (1, 2, 3)]
    r = flops.flops_per_token(m, seq_len=12, attention='dense', train_step_fractions=fr)
    assert abs(fc.get_total_flops() / 12 / r['training_flops_per_token'] - 1) < 1e-9
    m.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad(): out = m(ids)
    fr = [out.metrics[f'mor_frac_r{r}'] for r in (1, 2, 3)]
    r = flops.flops_per_token(m, seq_len=12, attention='dense', step_fractions=fr)
    assert abs(fc.get_total_flops() / 12 / r['inference_flops_per_token'] - 1) < 1e-9
    assert r['inference_ratio'] > 1 and flops.train_flops_per_token(m, seq_len=12) > 0

def test_ledger_pass_count():
    r = flops.flops_per_token('mor', 'llama-1.4b')                         # middle-cycle, N_r=3, capacities 1, 2/3, 1/3
    assert abs(r['paper_inference_ratio'] - (2 + 22 * 2) / 24) < 1e-12 and r['inference_ratio'] < r['paper_inference_ratio']
    full = flops.flops_per_token('mor', 'llama-1.4b', capacity=[1, 1, 1], sharing='cycle')
    loop = flops.flops_per_token('looped', 'llama-1.4b', n_loops=3)
    assert abs(full['inference_flops_per_token'] / loop['inference_flops_per_token'] - 1) < 1e-3   # + the tiny routers

@pytest.mark.parametrize('routing', ['expert', 'token'])
def test_training_lowers_the_loss(routing):
    torch.manual_seed(0)
    m = MoRLM(tiny('gpt_neox', dtype=torch.float32), routing=routing).train()
    router = m.routers[1] if routing == 'expert' else m.router
    w0 = router.weight.detach().clone()
    batch = torch.randint(1, V, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = m(batch, labels=batch)
        opt.zero_grad(); out.loss.backward(); opt.step(); losses.append(out.metrics['ce'])
        assert out.aux_loss is not None and abs(out.loss.item() - out.metrics['ce'] - out.aux_loss.item()) < 1e-5
    assert losses[-1] < losses[0] - 0.1, losses
    assert not torch.equal(router.weight.detach(), w0)

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('routing', ['expert', 'token'])
def test_flash_attention_path(arch, routing):
    "HF's flash-attention code path (emulated with reference kernels): compacted recursions and recursion caches"
    "give what SDPA gives, and cached decoding still equals recomputation."
    from latent_thoughts.attention import emulate_flash_attention, set_attention_backend
    m = MoRLM(tiny(arch), routing=routing)
    ids = torch.randint(1, V, (3, 9)); am = torch.ones_like(ids); am[1, 5:] = 0; am[2, :2] = 0
    with emulate_flash_attention():
        for train in (False, True):
            m.train(train)
            with torch.no_grad():
                ref = m(ids, attention_mask=am).logits
                set_attention_backend(m, 'flash_attention_2', device='cpu')
                got = m(ids, attention_mask=am).logits
                if not train: gen = m.generate(ids[:, :6], max_new_tokens=4), greedy_recompute(m, ids[:, :6], 4)
                set_attention_backend(m, 'sdpa', device='cpu')
            assert maxdiff(got[am.bool()], ref[am.bool()]) < 1e-10
            if not train: assert torch.equal(*gen)
