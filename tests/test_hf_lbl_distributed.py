"""Hugging Face drop-in with the global scope on real gloo processes: a DDP-wrapped tiny
Qwen3-MoE on 2 ranks x 3 micro-batches gives, on every rank, the aux loss computed from
the counts of all ranks' micro-batches so far (f global, P local), per-layer or batched,
eager or compiled."""
import pytest
import torch

import trainops
from trainops import reference as ref
from trainops.distributed.launch import spawn

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not trainops.has_extension(), reason="C++ extension not built")
M, WORLD = 3, 2


def _rank_batch(m, rank):
    g = torch.Generator().manual_seed(50 * m + rank)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5 + m + rank:] = 0  # padding, different on every rank and micro-batch
    return ids, mask


def _worker(rank, world, batched, compiled):
    from torch.nn.parallel import DistributedDataParallel

    from test_hf_lbl import _model
    from trainops.integrations.transformers import apply_global_load_balancing

    model = _model("qwen3_moe").train()
    losses = apply_global_load_balancing(model, scope="global", batch_all_reduce=batched)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    if compiled:
        ddp = torch.compile(ddp, backend="aot_eager")
    out = []
    for m in range(M):
        ids, mask = _rank_batch(m, rank)
        res = ddp(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        res.loss.backward()
        out.append((res.aux_loss.item(), [lbl.acc_counts.tolist() for lbl in losses], int(losses[0].acc_tokens)))
    return out


@pytest.mark.parametrize("batched, compiled", [(False, False), (True, False), (True, True)],
                         ids=["per_layer", "batched", "batched_compiled"])
def test_global_scope_on_two_ranks(batched, compiled):
    from test_hf_lbl import _model

    results = spawn(_worker, WORLD, batched, compiled)
    base = _model("qwen3_moe")  # unpatched: HF's own router logits of every layer
    K, layers = base.config.num_experts_per_tok, base.config.num_hidden_layers
    acc = [0] * layers
    tokens = 0
    for m in range(M):
        stats = []  # per rank: (per-layer (counts, prob_sum), valid tokens)
        for rank in range(WORLD):
            ids, mask = _rank_batch(m, rank)
            flat = mask.reshape(-1).bool()
            logits = base(input_ids=ids, attention_mask=mask).router_logits
            stats.append(([ref.router_topk(lg, K, mask=flat)[2:] for lg in logits], int(flat.sum())))
        acc = [acc[layer] + sum(s[0][layer][0] for s in stats) for layer in range(layers)]
        tokens += sum(s[1] for s in stats)
        for rank, (per_layer, n_local) in enumerate(stats):
            aux, counts, acc_tokens = results[rank][m]
            assert counts == [a.tolist() for a in acc] and acc_tokens == tokens
            expected = K * torch.stack([ref.lbl_from_stats(acc[layer], per_layer[layer][1], tokens, n_local, K)
                                        for layer in range(layers)]).mean()
            torch.testing.assert_close(torch.tensor(aux), expected, rtol=1e-5, atol=1e-6)
