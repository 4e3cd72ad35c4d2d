"""One Q-Former with its stage-1 heads, on transformers' ``Blip2QFormerModel`` + ``Blip2TextEmbeddings``.

What transformers lacks and is written here: the text-only and ITG passes (causal text mask over
visible queries), the ITG language-model head (tied to the word embeddings, as BERT's), the ITC
projections/temperature and the ITM head as BLIP-2 trains them, and BERT initialisation.

ITG reuses the query pass: transformers' Q-Former has no KV cache, so :meth:`QFormer.queries_with_kv`
records each layer's self-attention keys/values of the queries (forward hooks on the ``key``/``value``
Linears), and :meth:`QFormer.decode` runs only the text through the layers, attending to those and to
the text before it, as LAVIS's ``past_key_values`` (blip2_qformer.py). Queries see only queries under
the ITG mask, so this equals one pass over [queries; text] without computing the queries twice.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.blip_2.modeling_blip_2 import (Blip2QFormerModel, Blip2TextEmbeddings,
                                                        eager_attention_forward)

from msmedcap.config import QFormerConfig

log = logging.getLogger(__name__)


def qformer_hf_config(cfg: QFormerConfig, encoder_width: int, vocab_size: int, pad_token_id: int) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        cross_attention_frequency=cfg.cross_attention_freq, encoder_hidden_size=encoder_width,
        max_position_embeddings=512, pad_token_id=pad_token_id, use_qformer_text_input=True,
        attn_implementation="sdpa")


# What BLIP-2 adds to BERT (random at init, whatever BERT gives): learned queries, the LayerNorm on the image
# tokens, the ITC projections and temperature, the ITM head; and every layer's cross-attention. Every other
# Q-Former tensor comes from BERT when model.qformer.init_from is set (the query FFN as a copy of the text FFN).
BLIP2_ADDS = ("query_tokens", "ln_vision.", "vision_proj.", "text_proj.", "temp", "itm_head.", "adapter.")


class TokenAdapter(nn.Module):
    """Trainable, on each encoder token before ``ln_vision``: ``x + MLP(x)`` (hidden ``ratio`` x the width,
    GELU; the last layer zero, so the branch starts exactly as without it): the per-position nonlinearity
    that reads a finding at a lesion's few positions, which cross-attention (a weighted mean) lacks."""

    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, ratio * width), nn.GELU(), nn.Linear(ratio * width, width))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.mlp(tokens)


class QFormer(nn.Module):
    """Learned queries cross-attending one encoder's tokens (after a trainable LayerNorm, BLIP-2's
    ``ln_vision``, unless ``ln_vision=False``: then ``self.ln_vision`` is None and the tokens go in as
    they are, as the MSMedCap reference does for SAM; before it, with ``token_mlp``, a
    :class:`TokenAdapter`); text shares the self-attention. Heads: ITC projections + temperature, ITM, ITG."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, vocab_size: int, pad_token_id: int,
                 ln_vision: bool = True, token_mlp: int = 0):
        super().__init__()
        hf = qformer_hf_config(cfg, encoder_width, vocab_size, pad_token_id)
        h = cfg.hidden_size
        self.ln_vision = nn.LayerNorm(encoder_width) if ln_vision else None
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, h) * hf.initializer_range)
        self.embeddings = Blip2TextEmbeddings(hf)
        self.bert = Blip2QFormerModel(hf)  # .layernorm is BERT's embedding LayerNorm
        if cfg.cross_attention_init is not None:  # rescaled, not redrawn: the other tensors' init is unchanged
            for layer in self.bert.encoder.layer:
                if layer.has_cross_attention:
                    for linear in (layer.crossattention.attention.query, layer.crossattention.attention.key):
                        linear.weight.data.mul_(cfg.cross_attention_init / hf.initializer_range)
        # stage-1 heads
        self.vision_proj = nn.Linear(h, cfg.embed_dim)
        self.text_proj = nn.Linear(h, cfg.embed_dim)
        self.itm_head = nn.Linear(h, 2)
        # Shape [1], not []: DeepSpeed's initial broadcast views every parameter as bytes, which a 0-dim bf16 tensor refuses.
        self.temp = nn.Parameter(torch.full((1,), 0.07))
        # ITG head = BERT's LM prediction head; the decoder weight is the word embedding matrix
        self.itg_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=hf.layer_norm_eps))
        self.itg_bias = nn.Parameter(torch.zeros(vocab_size))
        self.num_queries = cfg.num_query_tokens
        self._init_heads(hf.initializer_range)
        # drawn last: every other tensor is initialised as without it (the same seed, the same model)
        self.adapter = TokenAdapter(encoder_width, token_mlp) if token_mlp else None

    def _init_heads(self, std: float) -> None:
        for module in (self.vision_proj, self.text_proj, self.itm_head, self.itg_transform[0]):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        emb = self.embeddings
        nn.init.normal_(emb.word_embeddings.weight, std=std)
        nn.init.normal_(emb.position_embeddings.weight, std=std)
        if emb.word_embeddings.padding_idx is not None:
            emb.word_embeddings.weight.data[emb.word_embeddings.padding_idx].zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.query_tokens.dtype

    # ----------------------------------------------------------------- passes
    def image_embeds(self, encoder_tokens: torch.Tensor) -> torch.Tensor:
        """Frozen encoder tokens -> token adapter (if any) -> trainable LayerNorm (if any), in this module's
        dtype."""
        tokens = encoder_tokens.to(self.dtype)
        if self.adapter is not None:
            tokens = self.adapter(tokens)
        return tokens if self.ln_vision is None else self.ln_vision(tokens)

    def image_embeds_trained(self) -> bool:
        """Whether :meth:`image_embeds` has trainable parameters (adapter, ln_vision) being trained."""
        return any(p.requires_grad for m in (self.adapter, self.ln_vision) if m is not None for p in m.parameters())

    def queries(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Query outputs ``[B, Q, H]`` (ITC image side, stage-2 input)."""
        q = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.bert(query_embeds=q, encoder_hidden_states=image_embeds).last_hidden_state

    def queries_with_kv(self, image_embeds: torch.Tensor):
        """:meth:`queries` and, per layer, the queries' self-attention ``(keys, values)`` ``[B, Q, H]``
        (with gradient), as they were computed in this pass: the ITG text attends to them (:meth:`decode`)."""
        kv: dict = {}
        handles = []
        for i, layer in enumerate(self.bert.encoder.layer):
            attn = layer.attention.attention  # self-attention; crossattention has Linears of its own
            for j, linear in enumerate((attn.key, attn.value)):
                handles.append(linear.register_forward_hook(
                    lambda _m, _args, out, at=(i, j): kv.__setitem__(at, out)))
        try:
            out = self.queries(image_embeds)
        finally:
            for h in handles:
                h.remove()
        return out, [(kv[i, 0], kv[i, 1]) for i in range(len(self.bert.encoder.layer))]

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass ``[B, T, H]`` (no cross-attention, text FFN)."""
        emb = self.embeddings(input_ids=input_ids)
        return self.bert(query_embeds=emb, query_length=0, attention_mask=attention_mask).last_hidden_state

    def multimodal(self, input_ids, attention_mask, image_embeds) -> torch.Tensor:
        """Queries + text with bidirectional self-attention, queries cross-attend (ITM): ``[B, Q, H]``."""
        q = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        emb = self.embeddings(input_ids=input_ids, query_embeds=q)
        mask = torch.cat([attention_mask.new_ones(q.shape[:2]), attention_mask], dim=1)
        out = self.bert(query_embeds=emb, query_length=self.num_queries, attention_mask=mask,
                        encoder_hidden_states=image_embeds).last_hidden_state
        return out[:, : self.num_queries]

    # ----------------------------------------------------------------- retrieval scores
    def similarity(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """ITC similarity ``[n_images, n_texts]``: the max over queries of the query-text cosine
        (before the temperature), as BLIP-2 and ``Blip2ForImageTextRetrieval`` score retrieval."""
        image_feats = F.normalize(self.vision_proj(self.queries(image_embeds)), dim=-1)
        text_feat = F.normalize(self.text_proj(self.text(input_ids, attention_mask)[:, 0]), dim=-1)
        return torch.einsum("iqd,td->itq", image_feats, text_feat).amax(-1)

    def itm_logits(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """ITM logits ``[n, 2]`` (no match, match) of the pairs (image ``i``, text ``i``): the ITM head
        averaged over the query outputs of the multimodal pass."""
        return self.itm_head(self.multimodal(input_ids, attention_mask, image_embeds)).mean(dim=1)

    def itg_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask ``[B, 1, Q+T, Q+T]``: queries see queries only; text sees all queries and the
        text up to itself (BLIP-2's image-grounded generation), padding hidden."""
        b, t = attention_mask.shape
        q, n = self.num_queries, self.num_queries + t
        allowed = torch.zeros(n, n, dtype=torch.bool, device=attention_mask.device)
        allowed[:, :q] = True
        allowed[q:, q:] = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
        keys = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1).bool()
        allowed = allowed[None] & keys[:, None, :]
        return torch.zeros(b, 1, n, n, dtype=dtype, device=attention_mask.device).masked_fill(
            ~allowed[:, None], torch.finfo(dtype).min)

    def decode(self, input_ids, attention_mask, image_embeds=None, query_kv=None, positions=None) -> torch.Tensor:
        """ITG logits ``[B, T, V]`` for text positions, conditioned on the queries (:meth:`decode_hidden`
        through :meth:`itg_head`); with ``positions`` (bool ``[B, T]``) only the logits ``[P, V]`` of those
        positions, row-major: the vocabulary-sized head runs on them alone."""
        h = self.decode_hidden(input_ids, attention_mask, image_embeds, query_kv)
        return self.itg_head(h if positions is None else h[positions])

    def itg_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's LM prediction head on ITG hidden states ``[..., H]`` -> ``[..., V]`` (decoder tied to the
        word embeddings)."""
        return F.linear(self.itg_transform(hidden), self.embeddings.word_embeddings.weight, self.itg_bias)

    def decode_hidden(self, input_ids, attention_mask, image_embeds=None, query_kv=None) -> torch.Tensor:
        """ITG hidden states ``[B, T, H]`` for text positions: the text alone runs through the layers (text
        FFN, no cross-attention), its self-attention over the queries' keys and values of ``query_kv``
        (from :meth:`queries_with_kv`; computed from ``image_embeds`` if not given) and the text up to
        itself (the text rows of :meth:`itg_mask`)."""
        if query_kv is None:
            query_kv = self.queries_with_kv(image_embeds)[1]
        bert = self.bert
        h = self.embeddings(input_ids=input_ids)  # positions from 0, as after the queries in one pass
        h = bert.dropout(bert.layernorm(h.to(bert.layernorm.weight.dtype)))
        mask = self.itg_mask(attention_mask, h.dtype)[:, :, self.num_queries:]  # [B, 1, T, Q+T]
        for layer, (keys, values) in zip(bert.encoder.layer, query_kv):
            attn = layer.attention.attention

            def heads(x: torch.Tensor) -> torch.Tensor:
                return x.view(*x.shape[:2], -1, attn.attention_head_size).transpose(1, 2)

            attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
            context, _ = attention(attn, heads(attn.query(h)), heads(torch.cat([keys, attn.key(h)], dim=1)),
                                   heads(torch.cat([values, attn.value(h)], dim=1)), mask,
                                   dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling)
            h = layer.feed_forward_chunk(layer.attention.output(context.reshape(*h.shape[:2], -1), h))
        return h

    # ----------------------------------------------------------------- init
    def init_from_bert(self, name_or_path: str) -> None:
        """BLIP-2's initialisation: BERT-base weights into self-attention, both FFNs (query FFN copied
        from the text FFN), embeddings and the LM head; cross-attention stays random."""
        from transformers import BertForMaskedLM

        from msmedcap.config import ConfigError, resolve_asset
        from msmedcap.models.encoders import weights_mismatch

        try:
            bert, info = BertForMaskedLM.from_pretrained(resolve_asset(name_or_path), output_loading_info=True)
        except (RuntimeError, ValueError, OSError) as e:
            raise ConfigError(f"model.qformer.init_from: {name_or_path} does not load as BERT: {str(e)[:500]}") from e
        absent = set(info.get("missing_keys", ()))  # random in `bert`: not from the file
        bert = {k: v for k, v in bert.state_dict().items() if k not in absent}
        mine = self.state_dict()
        loaded = {}

        def take(dst: str, src: str) -> None:
            if src in bert and dst in mine and bert[src].shape[1:] == mine[dst].shape[1:]:
                value = bert[src]
                if dst == "embeddings.word_embeddings.weight" or dst == "itg_bias":
                    n = min(value.shape[0], mine[dst].shape[0])  # our vocab adds [DEC]
                    value = torch.cat([value[:n], mine[dst][n:]])
                if value.shape == mine[dst].shape:
                    loaded[dst] = value

        take("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight")
        if "bert.embeddings.token_type_embeddings.weight" in bert:  # all text is segment 0: fold it in, so
            bert["bert.embeddings.position_embeddings.weight"] = (  # the text pass starts as BERT's
                bert["bert.embeddings.position_embeddings.weight"] + bert["bert.embeddings.token_type_embeddings.weight"][0])
        take("embeddings.position_embeddings.weight", "bert.embeddings.position_embeddings.weight")
        for p in ("weight", "bias"):
            take(f"bert.layernorm.{p}", f"bert.embeddings.LayerNorm.{p}")
            take(f"itg_transform.0.{p}", f"cls.predictions.transform.dense.{p}")
            take(f"itg_transform.2.{p}", f"cls.predictions.transform.LayerNorm.{p}")
        take("itg_bias", "cls.predictions.bias")
        for i in range(len(self.bert.encoder.layer)):
            src, dst = f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{i}."
            for p in ("weight", "bias"):
                for name in ("query", "key", "value"):
                    take(f"{dst}attention.attention.{name}.{p}", f"{src}attention.self.{name}.{p}")
                take(f"{dst}attention.output.dense.{p}", f"{src}attention.output.dense.{p}")
                take(f"{dst}attention.output.LayerNorm.{p}", f"{src}attention.output.LayerNorm.{p}")
                for suffix in ("", "_query"):
                    take(f"{dst}intermediate{suffix}.dense.{p}", f"{src}intermediate.dense.{p}")
                    take(f"{dst}output{suffix}.dense.{p}", f"{src}output.dense.{p}")
                    take(f"{dst}output{suffix}.LayerNorm.{p}", f"{src}output.LayerNorm.{p}")
        expected = [k for k in mine if not k.startswith(BLIP2_ADDS) and ".crossattention." not in k]
        missing = [k for k in expected if k not in loaded]
        if missing:
            lacks = (f" (the file lacks {len(absent)} of BertForMaskedLM's tensors: {', '.join(sorted(absent)[:4])}"
                     + (", ..." if len(absent) > 4 else "") + ")") if absent else ""
            raise weights_mismatch("model.qformer.init_from", name_or_path,
                                   f"the BERT the Q-Former starts from (hidden_size {self.bert.config.hidden_size}, "
                                   f"{len(self.bert.encoder.layer)} layers, with its masked-LM head for ITG){lacks}; "
                                   "Q-Former tensors it leaves random are", missing)
        self.load_state_dict(loaded, strict=False)
        log.info("Q-Former: %d of %d tensors initialised from BERT %s", len(loaded), len(mine), name_or_path)
