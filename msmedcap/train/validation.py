"""Validation during training (docs/validation.md): every ``train.eval_every`` steps, and at a stage's
last step, the stage's model is scored on the held-out ``data.val``; the best step so far by
``train.keep_best_by`` is exported to ``stageN/best/``; ``train.early_stop_patience`` ends a stage.

What a validation measures (the keys of its metrics.jsonl record):

- ``val/loss`` and the heads: stage 1 ``val/loss_itc|itm|itg`` (summed over branches, as training logs
  them) and ``val/loss_BRANCH/HEAD``, each branch's heads averaged over the samples routed to it (ITC and
  ITM contrast within a batch of ``eval.batch_size`` on one rank, so they depend on that batch size);
  stage 2 ``val/loss_lm``, the teacher-forced caption cross-entropy per caption token.
- every ``train.eval_generate_every`` steps in stage 2: greedy captions (``num_beams`` 1, the rest of
  ``eval``'s generation settings), ``val/cider`` (pycocoevalcap, tokenized as the evaluation does),
  ``val/findings`` (mean accuracy over the findings fields scored; ``val/findings/FIELD`` each) where a
  findings parser exists (msmedcap.eval.findings, as the evaluation finds it) and ``val/distinct`` (the
  share of distinct captions).

Every rank takes its share of ``data.val`` as the evaluation does (msmedcap.eval.evaluate: the same
loader, quota and exact-once check on rank 0), with no collective inside the losses (shares are
uneven). A validation runs under its own RNG (a generator seeded by ``train.seed`` for ITM's negatives;
the process's RNG states put back afterwards), so training with it is bit-identical to training without.
The best-so-far record (:attr:`Validator.record`) travels in the checkpoint, so a resumed run keeps it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from msmedcap.config import Config
from msmedcap.train.validation_settings import STAGE1_HEADS, measured_in, parse_keep_best

BEST_FILE = "best.json"  # in stageN/best/: which step and value the export is of


def _limited(batches, quota: int, skipped: dict):
    """Non-empty batches, the skip counts of all of them added to ``skipped``; with ``quota`` > 0 only the
    first ``quota`` samples (the last batch cut), as ``rank_quota`` shares out ``eval.val_max_samples``."""
    import torch

    seen = 0
    for batch in batches:
        for reason, n in (batch.get("skipped") or {}).items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
        n = len(batch["key"])
        if not n:
            continue
        if quota and seen + n > quota:
            keep = quota - seen
            batch = {k: (v[:keep] if (torch.is_tensor(v) and v.dim() and v.shape[0] == n)
                         or (isinstance(v, list) and len(v) == n) else v) for k, v in batch.items()}
            n = keep
        seen += n
        yield batch
        if quota and seen >= quota:
            return


class Validator:
    """One stage's validation. All ranks call :meth:`run` at the steps :meth:`due` names; rank 0 gathers,
    scores, logs and decides; every rank gets the decision (the best record, whether to stop)."""

    def __init__(self, cfg: Config, stage: int, world, model, log, best_dir: Path):
        t = cfg.train
        self.cfg, self.stage, self.world, self.model, self.log, self.best_dir = cfg, stage, world, model, log, best_dir
        self.every = t.eval_every
        self.generate_every = t.eval_generate_every if stage == 2 else 0  # stage 1 has no LM
        keep = parse_keep_best(t.keep_best_by, cfg) if t.keep_best_by else None
        self.keep = keep if keep is not None and stage in measured_in(keep.metric, cfg) else None
        self.patience = t.early_stop_patience if self.keep else 0
        # best so far: travels in the checkpoint (TrainState.validation)
        self.record = {"metric": self.keep.metric, "mode": self.keep.mode, "value": None, "step": None, "stale": 0} \
            if self.keep else None

    def restore(self, record: Optional[dict]) -> None:
        """A resumed stage's record, from its checkpoint (kept only if it is of the same metric and mode)."""
        if self.keep and record and (record.get("metric"), record.get("mode")) == (self.keep.metric, self.keep.mode):
            self.record = dict(record)

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def generates(self, step: int, total: int) -> bool:
        return bool(self.generate_every) and (step % self.generate_every == 0 or step == total)

    # ------------------------------------------------------------------ one validation
    def run(self, step: int, total: int) -> bool:
        """Validate at ``step``; True when every rank is to stop the stage (early stopping)."""
        from msmedcap.eval.gather import gather_to_rank0
        from msmedcap.models.stage1 import rank_local
        from msmedcap.train.checkpoint import rng_states, set_rng_states

        start, rank, size = time.time(), self.world.rank, self.world.size
        generate = self.generates(step, total)
        rng, was_training = rng_states(), self.model.training
        self.model.eval()
        try:
            with rank_local():
                part = self.measure(generate)
        finally:
            self.model.train(was_training)
            set_rng_states(rng)
        parts = gather_to_rank0(part, rank, size)
        decision: list = [None]
        if rank == 0:
            try:
                metrics = self.summarize(parts, generate)
                improved = self.update(step, metrics.get(self.keep.metric) if self.keep else None)
                decision = [{"metrics": metrics, "record": self.record, "improved": improved}]
            except Exception as e:  # noqa: BLE001 - every rank raises it, none waits for a decision that never comes
                decision = [e]
        if size > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(decision, src=0)
        if isinstance(decision[0], Exception):
            raise decision[0]
        self.record = decision[0]["record"]
        if decision[0]["improved"]:
            self.write_best(step)
        if self.log is not None:
            self.log.log_validation({"step": step, **decision[0]["metrics"],
                                     **({"val/best": self.record["value"], "val/best_step": self.record["step"]}
                                        if self.record else {}),
                                     "val/seconds": round(time.time() - start, 3)})
        return bool(self.patience and self.record["stale"] >= self.patience)

    def measure(self, generate: bool) -> dict:
        """This rank's share: loss sums and weights, its sample keys, captions when ``generate``."""
        import torch

        from msmedcap.data.loader import make_eval_loader
        from msmedcap.eval.evaluate import batch_records, generation_kwargs, rank_quota
        from msmedcap.train.world import to_device

        cfg, model, rank, size = self.cfg, self.model, self.world.rank, self.world.size
        loader = make_eval_loader(cfg, list(cfg.data.val), rank, size, cfg.eval.batch_size, count_batches=True)
        negatives = torch.Generator(device=model.device).manual_seed(cfg.train.seed)  # same draws every validation
        sums: dict = {}
        skipped: dict = {}
        records = []
        gen_kwargs = {**generation_kwargs(cfg), "num_beams": 1}

        def add(key, mean, weight):
            s = sums.setdefault(key, [0.0, 0])
            s[0] += float(mean) * weight
            s[1] += weight

        with torch.no_grad():
            for batch in _limited(loader, rank_quota(cfg.eval.val_max_samples, rank, size), skipped):
                inputs = to_device(batch, model.device)
                if self.stage == 1:
                    out = model.stage1_loss(inputs, generator=negatives)
                    routed = model.route(inputs["domain"]).sum(0).tolist()
                    for i, branch in enumerate(model.branches):
                        for head in STAGE1_HEADS:
                            add(f"loss_{branch}/{head}", out[f"{branch}/{head}"], int(routed[i]))
                else:
                    features = {b: model.encode(inputs, b) for b in model.branches}  # once for loss and captions
                    add("loss_lm", model.stage2_loss(inputs, image_features=features)["lm"],
                        int(batch["lm_attention_mask"].sum()))
                    if generate:
                        records += batch_records(batch, model.generate(inputs, image_features=features, **gen_kwargs))
                        continue
                records += [{"key": str(k)} for k in batch["key"]]  # what the exact-once check needs
        return {"records": records, "skipped": skipped, "sums": sums}

    def summarize(self, parts: list, generate: bool) -> dict:
        """Rank 0: the gathered shares -> the validation's metrics (checked exact-once)."""
        from msmedcap.eval.evaluate import merge_parts

        records, skipped, _ = merge_parts(parts, list(self.cfg.data.val), self.cfg.eval.val_max_samples)
        sums: dict = {}
        for part in parts:
            for key, (total, weight) in part["sums"].items():
                s = sums.setdefault(key, [0.0, 0])
                s[0], s[1] = s[0] + total, s[1] + weight
        means = {k: total / weight for k, (total, weight) in sums.items() if weight}
        out = {}
        if self.stage == 1:
            for head in STAGE1_HEADS:
                out[f"val/loss_{head}"] = sum(v for k, v in means.items() if k.endswith(f"/{head}"))
            out["val/loss"] = sum(out[f"val/loss_{h}"] for h in STAGE1_HEADS)
        else:
            out["val/loss"] = out["val/loss_lm"] = means.get("loss_lm")
        out.update({f"val/{k}": v for k, v in sorted(means.items()) if "/" in k})
        if generate:
            out.update(score_captions(records))
        out["val/samples"] = len(records)
        out["val/skipped"] = skipped
        return out

    def update(self, step: int, value: Optional[float]) -> bool:
        """Rank 0: a measured value either is a new best (True) or counts towards the patience."""
        if self.keep is None or value is None:
            return False
        rec = self.record
        if self.keep.better(value, rec["value"]):
            rec.update(value=value, step=step, stale=0)
            return True
        rec["stale"] += 1
        return False

    def write_best(self, step: int) -> None:
        """``stageN/best/``: the stage's export (the optimizer's fp32 masters, as the stage's final export
        holds them) at ``step``, published atomically by rank 0; collective (ZeRO holds the masters in parts)."""
        import json

        from msmedcap.atomic_files import atomic_write_text
        from msmedcap.models import save_trainable
        from msmedcap.train.checkpoint import AtomicDir
        from msmedcap.train.engine import fp32_masters
        from msmedcap.train.signals import fault_point

        masters = fp32_masters(self.model, self.stage)
        if self.world.rank == 0:
            target = AtomicDir(self.best_dir)
            tmp = target.begin()
            save_trainable(self.model, tmp, self.cfg, values=masters)
            atomic_write_text(tmp / BEST_FILE, json.dumps({"stage": self.stage, **self.record}, indent=2) + "\n")
            fault_point("validation.before_best_rename", self.stage, step, self.world.rank)
            target.publish()
        self.world.barrier()

    def summary(self) -> Optional[dict]:
        """What the stage's result (summary.json) says of the best step."""
        if not self.record:
            return None
        found = self.record["step"] is not None
        return {**{k: v for k, v in self.record.items() if k != "stale"},
                "export": str(self.best_dir) if found else None}


def score_captions(records: list) -> dict:
    """Greedy captions' ``val/cider``, ``val/distinct`` and findings accuracy (``val/findings`` the mean
    over the fields scored, ``val/findings/FIELD`` each; None without a parser's field)."""
    from msmedcap.eval.findings import score_findings
    from msmedcap.eval.scoring import cider

    refs = {r["key"]: r["references"] for r in records}
    preds = {r["key"]: r["prediction"] for r in records}
    block = score_findings(records)["overall"]
    fields = {f: s["accuracy"] for f, s in block["fields"].items() if s["n"]}
    return {"val/cider": cider(refs, preds), "val/distinct": block["distinct_predictions"]["share"],
            "val/findings": sum(fields.values()) / len(fields) if fields else None,
            **{f"val/findings/{f}": v for f, v in fields.items()}}
