"""The reference check: a strategy against the plain model on one device, robust to bf16 rounding.

1. The rank that holds the logits decodes the prompts with the plain model (math attention): the reference
   tokens and logits. Every rank gets the reference tokens.
2. The strategy decodes again with the reference's tokens fed in (teacher forcing). Both then see the same
   inputs at every step, so a near-tie argmax that flips under another reduction order cannot make the
   sequences diverge, and each step's logit error is the strategy's own.
3. Per step: max and mean abs logit error, and the step's logit scale (its largest reference logit). The
   numerics pass when every step's error is within RTOL[dtype] of its scale. Where the argmax differs, the
   reference's top-2 margin there is listed: a flip inside the tolerance is a near tie, not a failure.
4. The tokens rank 0 records in that pass must be the argmax of the strategy's own logits, step by step:
   tokens travel back from the last pipeline stage or the base, and a bug on that path fails the check even
   where every logit is right.
`tokens_equal` also says whether the measured (free-running) generation produced the reference's tokens: in
bf16 a near tie may flip one and the rest diverge; `passed` is the verdict.
"""
from __future__ import annotations

import torch

# relative to the step's logit scale; fp32 leaves room for the rounding a sharp init (model.init_std=0.3)
# amplifies through 4 layers, bf16 for its 8-bit mantissa over the same path
RTOL = {"float32": 2e-3, "bfloat16": 5e-2}


def reference_decode(cfg, prompts, device):
    """(tokens [B, n], logits [n, B, V]) of the plain model on this device, math attention."""
    from model.transformer import build_model, generate

    model = build_model(cfg.model, getattr(torch, cfg.hardware.dtype), device)
    return generate(model, prompts, cfg.workload.output_tokens, "math")


def compare_logits(logits: torch.Tensor, ref_logits: torch.Tensor, rtol: float) -> dict:
    """Teacher-forced logits [n, B, V] of the strategy against the reference's; see the module docstring."""
    logits, ref = logits.float().cpu(), ref_logits.float().cpu()
    err = (logits - ref).abs()  # [n, B, V]
    scale = ref.abs().amax(dim=(1, 2)).clamp_min(1e-30)  # [n]
    step_max = err.amax(dim=(1, 2))
    per_step = [{"step": i, "max_abs": float(step_max[i]), "mean_abs": float(err[i].mean()), "logit_scale": float(scale[i])}
                for i in range(err.shape[0])]
    top2 = ref.topk(2, dim=-1).values  # [n, B, 2]
    flips = [{"step": int(i), "sequence": int(b), "ref_margin": float(top2[i, b, 0] - top2[i, b, 1]),
              "step_max_abs": float(step_max[i])}
             for i, b in (logits.argmax(-1) != ref.argmax(-1)).nonzero().tolist()]
    return {"teacher_forced": True, "steps_compared": int(err.shape[0]), "max_abs_logit_error": float(step_max.max()),
            "mean_abs_logit_error": float(err.mean()), "max_rel_logit_error": float((step_max / scale).max()),
            "rtol": rtol, "numerics_ok": bool((step_max <= rtol * scale).all()), "per_step": per_step,
            "argmax_flips": flips}


def verdict(check: dict | None, forced_tokens: torch.Tensor | None, free_tokens: torch.Tensor | None) -> dict | None:
    """Rank 0: the check as the holder of the logits left it, plus what rank 0 recorded: the teacher-forced
    pass's tokens against the strategy's own argmax, and the measured generation's against the reference."""
    if check is None:
        return None
    check = dict(check)
    argmax, ref = torch.tensor(check.pop("strategy_argmax")), torch.tensor(check.pop("reference_tokens"))
    check["tokens_consistent"] = forced_tokens is not None and bool(torch.equal(argmax, forced_tokens.cpu()))
    check["tokens_equal"] = free_tokens is not None and bool(torch.equal(ref, free_tokens.cpu()))
    if free_tokens is not None and not check["tokens_equal"] and ref.shape == free_tokens.shape:
        seq, step = (ref != free_tokens.cpu()).nonzero()[0].tolist()
        check["first_mismatch"] = {"sequence": seq, "step": step}
    check["passed"] = check["numerics_ok"] and check["tokens_consistent"]
    return check


@torch.no_grad()
def teacher_forced_logits(model, prompt: torch.Tensor, served: torch.Tensor) -> torch.Tensor:
    """[n, V] logits of the plain model at each of the n served tokens, fed the prompt and the served tokens
    before it: one prefill of the whole context from an empty cache, math attention (no KV-cache path at all)."""
    from model.transformer import Step

    context = torch.cat([prompt, served[:-1]])[None]
    length = torch.tensor([context.shape[1]], device=context.device)
    model.setup_cache(1, context.shape[1], "math")
    x = model.tok_emb(context)
    step = Step(slice(0, 1), torch.zeros_like(length), length, prefill=True)
    for block in model.blocks:
        x = block(x, step)
    return model.lm_head(model.norm(x[0, len(prompt) - 1:])).float()


def check_request(logits: torch.Tensor, ref_logits: torch.Tensor, served: torch.Tensor, rtol: float) -> dict:
    """One served request against the plain model, teacher-forced on its served tokens: logits [n, V] within rtol
    of each step's scale, the served tokens the argmax of the strategy's own logits, and every argmax that differs
    from the reference's a near tie (the reference's top-2 margin inside the tolerance)."""
    c = compare_logits(logits[:, None], ref_logits[:, None], rtol)
    consistent = bool(torch.equal(logits.argmax(-1).cpu(), served.cpu()))
    ties = all(f["ref_margin"] <= 2 * rtol * c["per_step"][f["step"]]["logit_scale"] for f in c["argmax_flips"])
    return {"tokens": int(len(served)), "max_rel_logit_error": c["max_rel_logit_error"], "numerics_ok": c["numerics_ok"],
            "tokens_consistent": consistent, "argmax_flips": len(c["argmax_flips"]), "flips_are_ties": ties,
            "passed": c["numerics_ok"] and consistent and ties}
