"""The token adapter before a Q-Former's ``ln_vision`` (``model.<branch>.token_mlp`` / ``max_token``,
msmedcap.models.qformer.TokenAdapter): it starts as the identity, its max token is the max over the
tokens, and it trains where a few positions must decide (a small lesion among SAM's 256)."""
import torch

from msmedcap.models.qformer import QFormer
from msmedcap.models.qformer_settings import QFormerConfig

TINY = QFormerConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, cross_attention_freq=1,
                     num_query_tokens=4, embed_dim=16, cross_attention_init=0.2)


def qformer(seed: int = 0, **adapter) -> QFormer:
    torch.manual_seed(seed)
    return QFormer(TINY, 24, 50, 0, **adapter)


def test_the_mlp_starts_as_the_identity():
    plain, adapted = qformer().eval(), qformer(token_mlp=4).eval()
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"adapter.mlp.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")] and not unexpected
    tokens = torch.randn(3, 10, 24)
    torch.testing.assert_close(adapted.queries(adapted.image_embeds(tokens)), plain.queries(plain.image_embeds(tokens)),
                               atol=0, rtol=0)
    assert adapted.adapter.mlp[0].weight.shape == (96, 24)  # 4 x the token width


def test_the_max_token_is_the_max_over_the_adapted_tokens():
    q = qformer(token_mlp=2, max_token=True)
    torch.nn.init.normal_(q.adapter.mlp[2].weight, std=0.5)  # away from the identity
    q.ln_vision = None
    tokens = torch.randn(2, 7, 24)
    embeds = q.image_embeds(tokens)
    assert embeds.shape == (2, 8, 24)
    adapted = tokens + q.adapter.mlp(tokens)
    torch.testing.assert_close(embeds[:, :7], adapted)
    torch.testing.assert_close(embeds[:, 7], adapted.amax(dim=1))
    assert q.image_embeds_trained()
    q.adapter.requires_grad_(False)
    assert not q.image_embeds_trained()  # no ln_vision, the adapter frozen: stage 1 passes no gradient to embeds


def test_no_adapter_without_its_keys():
    q = qformer(token_mlp=0, max_token=False)
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

    q = qformer(1, token_mlp=2, max_token=True)
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
