"""Plain reference computations for parity tests: one HF forward per position, no cache, no masks.

Everything here follows the definitions in ../shared/DESIGN.md literally and slowly.
"""

from __future__ import annotations

import torch

from qstar.core.think import mask_meta_logits, sample_from_logits


def sequential_thought(qs, ids_row: torch.Tensor, i: int, uniforms=None) -> list[int]:
    """Decode ``t`` tokens autoregressively from ``x_0..x_i, <start>`` with the plain model.

    ``uniforms``: ``(t,)`` the draws for this (row, position), or ``None`` for greedy.
    """
    seq = torch.cat([ids_row[: i + 1], torch.tensor([qs.start_id])])
    out = []
    for d in range(qs.config.thought_len):
        h = qs.backbone(inputs_embeds=qs.embed(seq[None])).last_hidden_state[0, -1]
        logits = mask_meta_logits(qs.lm_logits(h), (qs.start_id, qs.end_id))
        u = None if uniforms is None else uniforms[d]
        tok = int(
            sample_from_logits(
                logits[None], None if u is None else u[None], qs.config.thought_temperature
            )[0]
        )
        out.append(tok)
        seq = torch.cat([seq, torch.tensor([tok])])
    return out


def sequential_hidden(
    qs, ids_row: torch.Tensor, i: int, thought: list[int], n_extra: int
) -> torch.Tensor:
    """Hidden states at ``<end>`` and the next ``n_extra`` true tokens after the thought at ``i``.

    Returns ``(1 + n_extra, H)`` from one plain forward of ``x_0..x_i <start> c <end> x_{i+1}..``.
    """
    L = ids_row.shape[0]
    future = [int(ids_row[j]) if j < L else qs.fill_id for j in range(i + 1, i + 1 + n_extra)]
    seq = torch.cat([ids_row[: i + 1], torch.tensor([qs.start_id, *thought, qs.end_id, *future])])
    h = qs.backbone(inputs_embeds=qs.embed(seq[None])).last_hidden_state[0]
    first = i + 1 + len(thought) + 1  # index of <end>
    return h[first : first + 1 + n_extra]


def reference_loss(qs, ids: torch.Tensor, thoughts: torch.Tensor, obj) -> dict[str, torch.Tensor]:
    """The training objective computed position by position with plain forwards.

    Args:
        ids: ``(B, L)`` without padding; thoughts: ``(B, k, L, t)`` (from the model's output).
    """
    cfg = qs.config
    B, L = ids.shape
    k, n = cfg.n_thoughts, cfg.n_true
    base_terms, mixed_terms = [], {j: [] for j in range(n)}
    policy_terms = []
    for b in range(B):
        h_base = qs.backbone(inputs_embeds=qs.embed(ids[b : b + 1])).last_hidden_state[0]
        lp_base = torch.log_softmax(qs.lm_logits(h_base).float(), -1)
        base_terms += [-lp_base[i, ids[b, i + 1]] for i in range(L - 1)]
        for i in range(L - 1):
            ll = torch.zeros(k)
            per_thought_nll = []
            for s in range(k):
                c = thoughts[b, s, i].tolist()
                h_after = sequential_hidden(qs, ids[b], i, c, n - 1)
                nlls = []
                for j in range(n):
                    if i + 1 + j >= L:
                        break
                    w = qs.mixing_head(h_base[i + j], h_after[j])
                    logits, _ = qs.mix_logits(w, h_base[i + j], h_after[j])
                    nll = -torch.log_softmax(logits.float(), -1)[ids[b, i + 1 + j]]
                    nlls.append(nll)
                    mixed_terms[j].append(nll)
                ll[s] = -sum(x.detach() for x in nlls)
                per_thought_nll.append(nlls)
            if obj.baseline == "mean":
                r = ll - ll.mean()
            elif obj.baseline == "leave_one_out":
                r = torch.stack([ll[s] - (ll.sum() - ll[s]) / (k - 1) for s in range(k)])
            else:  # "none": the gain over the base model's prediction of the same tokens
                base_ll = sum(
                    float(lp_base[i + j, ids[b, i + 1 + j]]) for j in range(min(n, L - 1 - i))
                )
                r = ll - base_ll
            if obj.reward_filter == "positive":
                r = r.clamp(min=0)
            elif obj.reward_filter == "best":
                best = int(r.argmax())
                r = torch.stack([r[s].clamp(min=0) if s == best else r[s] * 0 for s in range(k)])
            for s in range(k):
                c = thoughts[b, s, i].tolist()
                seq = torch.cat([ids[b, : i + 1], torch.tensor([qs.start_id, *c])])
                h = qs.backbone(inputs_embeds=qs.embed(seq[None])).last_hidden_state[0]
                logits = qs.lm_logits(h[i + 1 : i + 1 + len(c)]).float() / obj.policy_temperature
                logits = mask_meta_logits(logits, (qs.start_id, qs.end_id))
                lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
                lp = lp.mean() if obj.policy_logprob == "per_token" else lp.sum()
                policy_terms.append(-r[s] * lp)
    base = torch.stack(base_terms).mean()
    mixed = torch.stack([torch.stack(v).mean() for v in mixed_terms.values() if v]).mean()
    policy = torch.stack(policy_terms).mean()
    loss = obj.base_loss_weight * base + obj.mixed_loss_weight * mixed + obj.policy_weight * policy
    return {"loss": loss, "base_nll": base, "mixed_nll": mixed, "policy_loss": policy}
