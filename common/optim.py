"""LARS, the optimizer a script's --optimizer names, the parameter groups every method uses,
and the warmup-cosine schedule."""
import math

import torch


def param_groups(model, weight_decay):
    """The trainable parameters as `lars_split` groups them, as the official SimCLR, BYOL, Barlow
    Twins and VICReg code do."""
    return lars_split({"params": [p for p in model.parameters() if p.requires_grad],
                       "weight_decay": weight_decay})


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), in the form of the official
    SimCLR/Barlow Twins code:

        d = g + wd * w                                    (weight decay inside the update)
        d = d * eta * ||w|| / ||d||    unless excluded     (trust ratio; 1 if a norm is 0)
        m = momentum * m + d ;  w = w - lr * m

    Groups flagged `lars_exclude` (1-D parameters) skip both decay and the trust ratio.
    `clip`: LARC's clipping mode (apex's LARC, used by solo-learn's CIFAR recipes with eta 0.02):
    the trust ratio becomes min(trust / lr, 1), so no weight steps further than plain SGD would.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, clip=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False, clip=clip))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            # the whole group at once (torch._foreach_*): a few kernels per group instead of
            # several per parameter, which on a GPU is most of an optimizer step's cost
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            d = [p.grad for p in params]
            if not group["lars_exclude"]:
                d = torch._foreach_add(d, params, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(params))  # [P] one norm per tensor
                d_norm = torch.stack(torch._foreach_norm(d))
                trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                    torch.ones_like(w_norm))
                if group["clip"] and group["lr"] > 0:
                    trust = torch.clamp(trust / group["lr"], max=1.0)
                torch._foreach_mul_(d, trust.unbind(0))
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, d)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss


def lars_split(group):
    """A group without a `lars_exclude` flag, split into its weights (as given) and its 1-D
    parameters (biases, BN/LN scales and shifts: no weight decay, no LARS adaptation); empty parts
    are dropped."""
    if "lars_exclude" in group:
        return [group]
    weights = [p for p in group["params"] if p.ndim > 1]
    one_d = [p for p in group["params"] if p.ndim <= 1]
    return [part for part in (dict(group, params=weights, lars_exclude=False),
                              dict(group, params=one_d, weight_decay=0.0, lars_exclude=True))
            if part["params"]]


def build_optimizer(groups, args):
    """The optimizer of --optimizer over `groups` (dicts with their own weight decay), with
    --momentum (AdamW: beta1) and LARS's --lars-eta and --lars-clip. Its learning rate starts
    at 0: every script sets it at every step."""
    if args.optimizer in ("lars", "adamw"):
        # LARS as every official LARS recipe runs it: 1-D parameters neither decayed nor adapted,
        # also for the groups of a method whose SGD recipe decays everything (MoCo, SimSiam);
        # AdamW as DINO's ViT groups (utils.py get_params_groups): biases and norms not decayed
        groups = [part for group in groups for part in lars_split(group)]
    if args.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=args.momentum, eta=args.lars_eta, clip=args.lars_clip)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=0.0, betas=(args.momentum, 0.999))


def describe_optimizer(args):
    """E.g. 'LARS, momentum 0.9, eta 0.001' for the start-up lines."""
    name = {"lars": "LARS", "sgd": "SGD", "adamw": "AdamW"}[args.optimizer]
    extra = (f", eta {args.lars_eta:g}{', clipped' if args.lars_clip else ''}"
             if args.optimizer == "lars" else "")
    return f"{name}, {'beta1' if args.optimizer == 'adamw' else 'momentum'} {args.momentum:g}{extra}"


def warmup_cosine(step, total_steps, warmup_steps, peak, final=0.0, start=0.0):
    """Linear warmup from `start` to `peak` over `warmup_steps`, then cosine from `peak` to
    `final` at `total_steps`. Called every iteration; used for learning rates and EMA momenta."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Set the learning rate of every group; a group's `lr_scale` (default 1) multiplies it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
