"""The token adapter before a Q-Former's ``ln_vision`` (``model.<branch>.token_mlp``,
msmedcap.models.qformer.TokenAdapter): it starts as the identity, it is ``x + MLP(x)`` per token, and
it trains (its zero last layer does not block the first)."""
import torch

from msmedcap.models.qformer import QFormer
from msmedcap.models.qformer_settings import QFormerConfig

TINY = QFormerConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, cross_attention_freq=1,
                     num_query_tokens=4, embed_dim=16, cross_attention_init=0.2)


def qformer(seed: int = 0, token_mlp: int = 0) -> QFormer:
    torch.manual_seed(seed)
    return QFormer(TINY, 24, 50, 0, token_mlp=token_mlp)


def test_the_adapter_starts_as_the_identity_and_leaves_the_other_tensors_as_the_seed_draws_them():
    plain, adapted = qformer().eval(), qformer(token_mlp=4).eval()
    theirs, mine = plain.state_dict(), adapted.state_dict()
    assert sorted(set(mine) - set(theirs)) == [f"adapter.mlp.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    tokens = torch.randn(3, 10, 24)
    torch.testing.assert_close(adapted.queries(adapted.image_embeds(tokens)), plain.queries(plain.image_embeds(tokens)),
                               atol=0, rtol=0)
    assert adapted.adapter.mlp[0].weight.shape == (96, 24)  # 4 x the token width


def test_the_adapter_is_a_residual_mlp_per_token_before_ln_vision():
    q = qformer(token_mlp=2)
    torch.nn.init.normal_(q.adapter.mlp[2].weight, std=0.5)  # away from the identity
    tokens = torch.randn(2, 7, 24)
    mlp = q.adapter.mlp
    adapted = tokens + mlp[2](torch.nn.functional.gelu(mlp[0](tokens)))
    torch.testing.assert_close(q.image_embeds(tokens), q.ln_vision(adapted))
    torch.testing.assert_close(q.image_embeds(tokens)[:, 3], q.image_embeds(tokens[:, 3:4])[:, 0])  # per token
    assert q.image_embeds_trained()
    q.ln_vision.requires_grad_(False)
    assert q.image_embeds_trained()  # the adapter alone: stage 1 still passes a gradient to the embeds
    q.adapter.requires_grad_(False)
    assert not q.image_embeds_trained()


def test_no_adapter_without_token_mlp():
    q = qformer(token_mlp=0)
    assert q.adapter is None
    assert not any(n.startswith("adapter.") for n in q.state_dict())


def test_a_finding_at_one_of_many_positions_trains_through_the_adapter():
    """One signed token among 48 decides the label; the adapted Q-Former (trained on it) reads it."""
    def task(n: int, g: torch.Generator):
        tokens = torch.randn(n, 48, 24, generator=g) * 0.3
        label = torch.randint(0, 2, (n,), generator=g)
        where = torch.randint(0, 48, (n,), generator=g)
        tokens[torch.arange(n), where, 0] += 3.0  # a "lesion": channel 0 high at one position
        tokens[torch.arange(n), where, 1] += torch.where(label.bool(), 2.0, -2.0)  # its "margin"
        return tokens, label

    q = qformer(1, token_mlp=2)
    head = torch.nn.Linear(32, 2)
    opt = torch.optim.AdamW([*q.parameters(), *head.parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, y = task(16, g)
        loss = torch.nn.functional.cross_entropy(head(q.queries(q.image_embeds(x)).mean(1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert q.adapter.mlp[0].weight.grad.abs().sum() > 0  # the zero last layer does not block the first
    x, y = task(200, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (head(q.queries(q.image_embeds(x)).mean(1)).argmax(-1) == y).float().mean() > 0.9
